//! The agent's ends of a process's stdio: output copied to the host with small writes
//! gathered into large ones, and host input copied into the process.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// How long an output copy waits for more bytes before sending what it has. Every write
/// to the host is a vsock packet whose cost in the guest kernel dwarfs the bytes it
/// carries, and pipes hand over a page at a time: gathering turns a stream of 4 KiB
/// reads into 64 KiB packets for a delay too short to notice interactively.
const GATHER_WAIT_MS: u16 = 2;
/// Largest write to the host.
const CHUNK: usize = 64 * 1024;

/// The process's stdin (or terminal input), closed by whoever sees its end first.
pub type Input = Arc<Mutex<Option<File>>>;

fn readable_within(f: &File, ms: u16) -> bool {
    use nix::poll::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, ms), Ok(n) if n > 0)
}

/// Copies the process's output `from` to the host stream `to` until end of file, then
/// half-closes the stream: the host sees the end of the output.
pub fn copy_out(mut from: File, mut to: UnixStream) {
    let mut buf = vec![0u8; CHUNK];
    let mut eof = false;
    while !eof {
        let mut len = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // EIO: a terminal whose last slave closed.
            Err(_) => break,
        };
        while len < buf.len() && readable_within(&from, GATHER_WAIT_MS) {
            match from.read(&mut buf[len..]) {
                Ok(0) | Err(_) => {
                    eof = true;
                    break;
                }
                Ok(n) => len += n,
            }
        }
        if to.write_all(&buf[..len]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Copies host input into the process until the host's stream ends, then closes the
/// process's input.
pub fn copy_in(mut from: UnixStream, to: Input) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut guard = to.lock().unwrap_or_else(|e| e.into_inner());
                let written = guard.as_mut().map(|f| f.write_all(&buf[..n]).is_ok());
                if written != Some(true) {
                    break;
                }
            }
        }
    }
    to.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// Starts a named thread; a thread that cannot start is logged (the stream stays idle).
pub fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        eprintln!("runvm-agent: thread {name}: {e}");
    }
}
