//! `fs-check DIR [HOST_DIR]`: POSIX behaviour and containment checks for a directory
//! shared from the host, run inside a container. Prints `ok NAME` or `FAIL NAME: why` per
//! check and exits 1 if any failed. The environment variable SECRET holds the content of
//! a host file outside the share (at HOST_DIR/../secret-dir/secret on the host); no check
//! may ever read it.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

type Check = Result<(), String>;

/// One named check over its own directory.
type CheckFn = &'static dyn Fn(&Path) -> Check;

fn ensure(cond: bool, why: impl FnOnce() -> String) -> Check {
    if cond {
        Ok(())
    } else {
        Err(why())
    }
}

fn e(x: std::io::Error) -> String {
    x.to_string()
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn ownership(d: &Path) -> Check {
    let f = d.join("owned");
    fs::write(&f, "x").map_err(e)?;
    std::os::unix::fs::chown(&f, Some(1000), Some(1001)).map_err(e)?;
    let m = fs::metadata(&f).map_err(e)?;
    ensure((m.uid(), m.gid()) == (1000, 1001), || {
        format!("owner {}:{}", m.uid(), m.gid())
    })
}

fn modes(d: &Path) -> Check {
    let f = d.join("moded");
    fs::write(&f, "x").map_err(e)?;
    for mode in [0o640, 0o4755, 0o1777, 0o000] {
        fs::set_permissions(&f, fs::Permissions::from_mode(mode)).map_err(e)?;
        let got = fs::metadata(&f).map_err(e)?.mode() & 0o7777;
        ensure(got == mode, || format!("mode {got:o}, want {mode:o}"))?;
    }
    Ok(())
}

fn timestamps(d: &Path) -> Check {
    let f = d.join("timed");
    fs::write(&f, "x").map_err(e)?;
    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123,
        },
        libc::timespec {
            tv_sec: 1_200_000_000,
            tv_nsec: 456_789,
        },
    ];
    // SAFETY: utimensat with a valid path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, cstr(&f).as_ptr(), times.as_ptr(), 0) };
    ensure(r == 0, || std::io::Error::last_os_error().to_string())?;
    let m = fs::metadata(&f).map_err(e)?;
    ensure((m.atime(), m.atime_nsec()) == (1_000_000_000, 123), || {
        format!("atime {} {}", m.atime(), m.atime_nsec())
    })?;
    ensure(
        (m.mtime(), m.mtime_nsec()) == (1_200_000_000, 456_789),
        || format!("mtime {} {}", m.mtime(), m.mtime_nsec()),
    )
}

fn xattrs(d: &Path) -> Check {
    let f = d.join("xattred");
    fs::write(&f, "x").map_err(e)?;
    let name = CString::new("user.runvm").unwrap();
    let p = cstr(&f);
    // SAFETY: setxattr/getxattr/listxattr with valid strings and buffers of the sizes given.
    unsafe {
        if libc::setxattr(p.as_ptr(), name.as_ptr(), b"value".as_ptr().cast(), 5, 0) != 0 {
            return Err(format!("setxattr: {}", std::io::Error::last_os_error()));
        }
        let mut buf = [0u8; 64];
        let n = libc::getxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        );
        ensure(n == 5 && &buf[..5] == b"value", || {
            format!("getxattr gave {n}")
        })?;
        let n = libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
        ensure(
            n > 0
                && buf[..n as usize]
                    .split(|b| *b == 0)
                    .any(|s| s == b"user.runvm"),
            || "listxattr".into(),
        )?;
        ensure(libc::removexattr(p.as_ptr(), name.as_ptr()) == 0, || {
            "removexattr".into()
        })
    }
}

fn symlinks(d: &Path) -> Check {
    let l = d.join("link");
    std::os::unix::fs::symlink("some/target", &l).map_err(e)?;
    ensure(
        fs::read_link(&l).map_err(e)? == Path::new("some/target"),
        || "readlink".into(),
    )?;
    ensure(
        fs::symlink_metadata(&l)
            .map_err(e)?
            .file_type()
            .is_symlink(),
        || "not a symlink".into(),
    )
}

fn hard_links(d: &Path) -> Check {
    let a = d.join("ha");
    let b = d.join("hb");
    fs::write(&a, "one").map_err(e)?;
    fs::hard_link(&a, &b).map_err(e)?;
    let (ma, mb) = (fs::metadata(&a).map_err(e)?, fs::metadata(&b).map_err(e)?);
    ensure(ma.ino() == mb.ino() && ma.nlink() == 2, || {
        format!("ino {} {} nlink {}", ma.ino(), mb.ino(), ma.nlink())
    })?;
    fs::write(&a, "two").map_err(e)?;
    ensure(fs::read_to_string(&b).map_err(e)? == "two", || {
        "write through one link not seen through the other".into()
    })
}

fn rename_over(d: &Path) -> Check {
    let (a, b) = (d.join("ra"), d.join("rb"));
    fs::write(&a, "new").map_err(e)?;
    fs::write(&b, "old").map_err(e)?;
    fs::rename(&a, &b).map_err(e)?;
    ensure(
        !a.exists() && fs::read_to_string(&b).map_err(e)? == "new",
        || "rename over an existing file".into(),
    )
}

fn append(d: &Path) -> Check {
    let f = d.join("appended");
    fs::write(&f, "a").map_err(e)?;
    for s in ["b", "c"] {
        let mut h = OpenOptions::new().append(true).open(&f).map_err(e)?;
        h.seek(SeekFrom::Start(0)).map_err(e)?;
        h.write_all(s.as_bytes()).map_err(e)?;
    }
    ensure(fs::read_to_string(&f).map_err(e)? == "abc", || {
        "O_APPEND did not append".into()
    })
}

fn mmap_shared(d: &Path) -> Check {
    let f = d.join("mapped");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&f)
        .map_err(e)?;
    file.set_len(8192).map_err(e)?;
    // SAFETY: a shared mapping of 8 KiB of a file we opened read-write; unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        std::ptr::copy_nonoverlapping(b"through mmap".as_ptr(), p.cast::<u8>().add(4096), 12);
        libc::msync(p, 8192, libc::MS_SYNC);
        libc::munmap(p, 8192);
    }
    let mut buf = vec![0u8; 8192];
    File::open(&f).map_err(e)?.read_exact(&mut buf).map_err(e)?;
    ensure(&buf[4096..4108] == b"through mmap", || {
        "mmap write not visible through read".into()
    })
}

fn sparse(d: &Path) -> Check {
    let f = d.join("sparse");
    let mut h = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&f)
        .map_err(e)?;
    h.seek(SeekFrom::Start((1 << 30) - 1)).map_err(e)?;
    h.write_all(b"z").map_err(e)?;
    drop(h);
    let m = fs::metadata(&f).map_err(e)?;
    ensure(m.len() == 1 << 30, || format!("size {}", m.len()))?;
    ensure(m.blocks() * 512 < 1 << 20, || {
        format!("{} bytes allocated for a sparse file", m.blocks() * 512)
    })?;
    let mut h = File::open(&f).map_err(e)?;
    h.seek(SeekFrom::Start(1 << 29)).map_err(e)?;
    let mut b = [1u8; 4];
    h.read_exact(&mut b).map_err(e)?;
    ensure(b == [0; 4], || "holes do not read as zeros".into())
}

fn big_dir(d: &Path) -> Check {
    let dir = d.join("many");
    fs::create_dir(&dir).map_err(e)?;
    // mknodat relative to the directory: two FUSE requests per entry (LOOKUP, MKNOD) where
    // open+close costs four, which matters when every request is a guest exit.
    let dfd = File::open(&dir).map_err(e)?;
    for i in 0..10_000 {
        let name = CString::new(format!("f{i:05}")).unwrap();
        // SAFETY: `name` is a NUL-terminated string and `dfd` an open directory descriptor.
        let rc = unsafe { libc::mknodat(dfd.as_raw_fd(), name.as_ptr(), libc::S_IFREG | 0o644, 0) };
        if rc != 0 {
            return Err(format!(
                "mknodat f{i:05}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let n = fs::read_dir(&dir).map_err(e)?.count();
    ensure(n == 10_000, || format!("{n} entries listed"))?;
    ensure(
        dir.join("f09999").exists() && dir.join("f00000").exists(),
        || "lookup".into(),
    )
}

fn fsync(d: &Path) -> Check {
    let f = d.join("synced");
    let mut h = File::create(&f).map_err(e)?;
    h.write_all(b"durable").map_err(e)?;
    h.sync_all().map_err(e)?;
    h.sync_data().map_err(e)
}

/// Reads `p` and fails if it yields the host secret.
fn not_secret(p: &Path, secret: &str) -> Check {
    match fs::read_to_string(p) {
        Ok(s) if s.contains(secret) => Err(format!("read the host secret through {}", p.display())),
        _ => Ok(()),
    }
}

fn escapes(d: &Path, host_dir: Option<&Path>, secret: &str) -> Check {
    // `d` is DIR/escape; the secret is at HOST_DIR/../secret-dir/secret on the host.
    not_secret(&d.join("../../secret-dir/secret"), secret)?;
    not_secret(&d.join("../../../../../../secret-dir/secret"), secret)?;
    std::os::unix::fs::symlink("../../secret-dir/secret", d.join("rel-link")).map_err(e)?;
    not_secret(&d.join("rel-link"), secret)?;
    let host_secret = host_dir
        .map(|h| h.join("../secret-dir/secret"))
        .unwrap_or_else(|| PathBuf::from("/secret"));
    std::os::unix::fs::symlink(&host_secret, d.join("abs-link")).map_err(e)?;
    not_secret(&d.join("abs-link"), secret)?;
    // /proc/self/fd: a descriptor of the share's directory, walked upwards.
    let dirf = File::open(d).map_err(e)?;
    not_secret(
        &PathBuf::from(format!(
            "/proc/self/fd/{}/../../secret-dir/secret",
            dirf.as_raw_fd()
        )),
        secret,
    )?;
    // A symlink swapped in by a rename race while another thread reads through the path.
    let real = d.join("swap-real");
    fs::create_dir(&real).map_err(e)?;
    fs::write(real.join("secret"), "decoy").map_err(e)?;
    let target = host_dir
        .map(|h| h.join("../secret-dir"))
        .unwrap_or_else(|| PathBuf::from("/secret-dir"));
    let sw = d.join("swap");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (d, real, sw, stop) = (d.to_path_buf(), real.clone(), sw.clone(), stop.clone());
        std::thread::spawn(move || {
            let link = d.join("swap-link");
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 400 {
                let _ = fs::remove_file(&link);
                let _ = std::os::unix::fs::symlink(&target, &link);
                let _ = fs::rename(if i.is_multiple_of(2) { &link } else { &real }, &sw);
                if i.is_multiple_of(2) {
                    let _ = fs::rename(&sw, d.join("swap-old-link"));
                } else {
                    let _ = fs::rename(&sw, &real);
                }
                i += 1;
            }
        })
    };
    let mut result = Ok(());
    for _ in 0..400 {
        if let Err(err) = not_secret(&sw.join("secret"), secret) {
            result = Err(err);
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = swapper.join();
    result?;
    // Device nodes made in the share cannot be used: the host mounts it nodev.
    for (name, kind, major, minor) in [("blk", libc::S_IFBLK, 8, 0), ("mem", libc::S_IFCHR, 1, 1)] {
        let p = d.join(name);
        // SAFETY: mknod with a valid path.
        let made =
            unsafe { libc::mknod(cstr(&p).as_ptr(), kind | 0o600, libc::makedev(major, minor)) }
                == 0;
        if made {
            let opened = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&p);
            ensure(opened.is_err(), || {
                format!("opened device node {name} made in the share")
            })?;
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: fs-check DIR [HOST_DIR]");
        std::process::exit(2);
    };
    let host_dir = args.get(1).map(PathBuf::from);
    let secret = std::env::var("SECRET").unwrap_or_else(|_| "no-secret-given".into());
    let checks: [(&str, CheckFn); 11] = [
        ("ownership", &ownership),
        ("modes", &modes),
        ("timestamps", &timestamps),
        ("xattrs", &xattrs),
        ("symlinks", &symlinks),
        ("hard-links", &hard_links),
        ("rename-over", &rename_over),
        ("append", &append),
        ("mmap-shared", &mmap_shared),
        ("sparse-1g", &sparse),
        ("fsync", &fsync),
    ];
    let mut failed = false;
    let mut report = |name: &str, r: Check| match r {
        Ok(()) => println!("ok {name}"),
        Err(why) => {
            failed = true;
            println!("FAIL {name}: {why}");
        }
    };
    for (name, check) in checks {
        let sub = dir.join(name);
        let r = fs::create_dir_all(&sub)
            .map_err(e)
            .and_then(|()| check(&sub));
        report(name, r);
    }
    let big = dir.join("dir-10000");
    report(
        "dir-10000",
        fs::create_dir_all(&big)
            .map_err(e)
            .and_then(|()| big_dir(&big)),
    );
    let esc = dir.join("escape");
    let r = fs::create_dir_all(&esc)
        .map_err(e)
        .and_then(|()| escapes(&esc, host_dir.as_deref(), &secret));
    report("containment", r);
    std::process::exit(i32::from(failed));
}
