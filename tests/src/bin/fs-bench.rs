//! File-system workload for the share benchmark, run the same way in a container (over
//! virtio-fs) and on the host (on the directory the share exposes): sequential write and
//! read of one file (1 MiB writes, fsync, page cache dropped for the file before reading)
//! and small-file create+stat. Prints `key=value` lines.
//!
//! usage: fs-bench DIR [MIB] [FILES]

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: fs-bench DIR [MIB] [FILES]");
        std::process::exit(2);
    };
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(32);
    let files: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(500);
    let work = dir.join(format!("fs-bench-{}", std::process::id()));
    fs::create_dir_all(&work).expect("work dir");

    let big = work.join("seq");
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let t = Instant::now();
    let mut f = File::create(&big).expect("create");
    for _ in 0..mib {
        f.write_all(&chunk).expect("write");
    }
    f.sync_all().expect("fsync");
    let write_s = t.elapsed().as_secs_f64();
    // SAFETY: a valid descriptor; advice only drops this file's cached pages.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    drop(f);

    let t = Instant::now();
    let mut f = File::open(&big).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    let read_s = t.elapsed().as_secs_f64();
    assert_eq!(total, mib << 20, "short read");

    let small = work.join("small");
    fs::create_dir(&small).expect("small dir");
    let t = Instant::now();
    for i in 0..files {
        let p = small.join(format!("f{i}"));
        File::create(&p).expect("create small");
        let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is NUL-terminated and `st` is written by stat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::stat(c.as_ptr(), &mut st) }, 0, "stat");
    }
    let small_s = t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(&work);

    println!("seq_write_mib_s={:.2}", mib as f64 / write_s);
    println!("seq_read_mib_s={:.2}", mib as f64 / read_s);
    println!("create_stat_per_s={:.1}", files as f64 / small_s);
}
