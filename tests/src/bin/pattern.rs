//! `pattern N`: writes N bytes of a position-dependent pattern to stdout in 64 KiB writes;
//! `pattern --check N` reads stdin and verifies it is exactly that. Cheap to generate in a
//! guest (no extra copies), and any loss, reordering or corruption shows.

use std::io::{Read, Write};

use runvm_tests::pattern_byte as byte_at;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (check, n) = match args.as_slice() {
        [n] => (false, n.parse::<u64>()),
        [flag, n] if flag == "--check" => (true, n.parse::<u64>()),
        _ => {
            eprintln!("usage: pattern [--check] BYTES");
            std::process::exit(2);
        }
    };
    let Ok(n) = n else {
        eprintln!("pattern: bad byte count");
        std::process::exit(2);
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    if check {
        let mut stdin = std::io::stdin().lock();
        loop {
            let got = stdin.read(&mut buf).unwrap_or(0);
            if got == 0 {
                break;
            }
            for (k, b) in buf[..got].iter().enumerate() {
                if *b != byte_at(pos + k as u64) {
                    eprintln!("pattern: mismatch at byte {}", pos + k as u64);
                    std::process::exit(1);
                }
            }
            pos += got as u64;
        }
        if pos != n {
            eprintln!("pattern: got {pos} bytes, want {n}");
            std::process::exit(1);
        }
        return;
    }
    let mut out = std::io::stdout().lock();
    while pos < n {
        let len = buf.len().min((n - pos) as usize);
        for (k, b) in buf[..len].iter_mut().enumerate() {
            *b = byte_at(pos + k as u64);
        }
        if out.write_all(&buf[..len]).is_err() {
            std::process::exit(1);
        }
        pos += len as u64;
    }
}
