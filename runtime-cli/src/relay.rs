//! Relaying one guest process to the host: bytes between host descriptors (pipes, files, a
//! pty) and the agent's stdio streams of the process, and catchable signals from the host
//! process to the guest process. The VMM supervisor, the exec proxy and `vm-run` all relay
//! through here.
//!
//! Output is complete when [`Relay::finish`] returns: each output copy ends when the
//! agent closes its stream, which it does once the process's output is written.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use agent_protocol::{Stdio, StreamKind};
use nix::sys::signal::{SigSet, Signal};

use crate::agent_client::{AgentClient, ClientError};

/// Signals forwarded to a guest process by the host process that stands for it (the VMM
/// for the container's process, the proxy for an exec'd one); SIGWINCH becomes a terminal
/// resize.
pub const FORWARDED: [Signal; 9] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCONT,
    Signal::SIGALRM,
];

/// The set of [`FORWARDED`] signals.
pub fn forwarded_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set
}

/// Blocks the forwarded signals in the calling thread (and the threads it starts later), so
/// that only [`forward_signals`] receives them.
pub fn block_forwarded() -> nix::Result<()> {
    forwarded_set().thread_block()
}

/// Starts the thread that receives the forwarded signals and hands each to `on_signal`.
/// The signals must be blocked in every thread ([`block_forwarded`]).
pub fn forward_signals(mut on_signal: impl FnMut(Signal) + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = forwarded_set();
            while let Ok(sig) = set.wait() {
                on_signal(sig);
            }
        })?;
    Ok(())
}

/// A descriptor of our own on `fd` (one of the standard streams, say).
pub fn dup(fd: impl AsFd) -> io::Result<File> {
    Ok(File::from(fd.as_fd().try_clone_to_owned()?))
}

/// Host ends of a process's standard streams.
pub enum HostIo {
    /// Separate streams (pipes, files); `None` ones are not attached and the process gets
    /// /dev/null there.
    Pipes {
        stdin: Option<Box<dyn Read + Send>>,
        stdout: Option<Box<dyn Write + Send>>,
        stderr: Option<Box<dyn Write + Send>>,
    },
    /// A terminal: what the process reads comes from `input`, what it writes goes to
    /// `output` (both ends of one host pty, or the caller's terminal).
    Terminal { input: File, output: File },
}

impl std::fmt::Debug for HostIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => f
                .debug_struct("Pipes")
                .field("stdin", &stdin.is_some())
                .field("stdout", &stdout.is_some())
                .field("stderr", &stderr.is_some())
                .finish(),
            HostIo::Terminal { .. } => f.write_str("Terminal"),
        }
    }
}

impl HostIo {
    /// This process's own stdin, stdout and stderr (duplicated).
    pub fn inherited() -> io::Result<Self> {
        Ok(HostIo::Pipes {
            stdin: Some(Box::new(dup(io::stdin())?)),
            stdout: Some(Box::new(dup(io::stdout())?)),
            stderr: Some(Box::new(dup(io::stderr())?)),
        })
    }

    /// Which streams the agent must expect (all false for a terminal).
    pub fn stdio(&self) -> Stdio {
        match self {
            HostIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => Stdio {
                stdin: stdin.is_some(),
                stdout: stdout.is_some(),
                stderr: stderr.is_some(),
            },
            HostIo::Terminal { .. } => Stdio::default(),
        }
    }
}

/// Copies `from` to `to` until end of stream or an error on either side.
fn copy(mut from: impl Read, mut to: impl Write) -> io::Result<u64> {
    let n = io::copy(&mut from, &mut to)?;
    to.flush()?;
    Ok(n)
}

/// Host input to the guest; end of input closes the process's stdin. Not joined: the
/// host's input may never end (a terminal); the thread ends with the process.
fn spawn_input(from: impl Read + Send + 'static, to: UnixStream, half_close: bool) {
    let spawned = std::thread::Builder::new()
        .name("relay-in".into())
        .spawn(move || {
            let _ = copy(from, &to);
            if half_close {
                let _ = to.shutdown(std::net::Shutdown::Write);
            }
        });
    if let Err(e) = spawned {
        log::warn!("relay: input thread: {e}");
    }
}

/// The copies of one process's streams.
#[derive(Debug)]
pub struct Relay {
    process: String,
    outputs: Vec<JoinHandle<io::Result<u64>>>,
}

impl Relay {
    /// Attaches the streams `io` needs to process `process` (registered with the agent,
    /// not started) and starts copying.
    pub fn attach(client: &AgentClient, process: &str, io: HostIo) -> Result<Self, ClientError> {
        let mut outputs = Vec::new();
        match io {
            HostIo::Terminal { input, output } => {
                let stream = client.attach(process, StreamKind::Terminal)?;
                spawn_input(
                    input,
                    stream.try_clone().map_err(ClientError::Stream)?,
                    false,
                );
                outputs.push(spawn_output(stream, output)?);
            }
            HostIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                if let Some(input) = stdin {
                    spawn_input(input, client.attach(process, StreamKind::Stdin)?, true);
                }
                for (kind, out) in [(StreamKind::Stdout, stdout), (StreamKind::Stderr, stderr)] {
                    if let Some(out) = out {
                        outputs.push(spawn_output(client.attach(process, kind)?, out)?);
                    }
                }
            }
        }
        Ok(Relay {
            process: process.to_string(),
            outputs,
        })
    }

    /// Waits until every output stream reached its end (all output is on the host).
    pub fn finish(self) {
        for t in self.outputs {
            if let Ok(Err(e)) = t.join() {
                log::debug!("process {}: output copy ended with {e}", self.process);
            }
        }
    }
}

fn spawn_output(
    from: UnixStream,
    to: impl Write + Send + 'static,
) -> Result<JoinHandle<io::Result<u64>>, ClientError> {
    std::thread::Builder::new()
        .name("relay-out".into())
        .spawn(move || copy(from, to))
        .map_err(ClientError::Stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_reach_the_end_of_the_stream_and_flush() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let sink = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let t = spawn_output(a, Sink(sink.clone())).unwrap();
        b.write_all(b"hello").unwrap();
        drop(b);
        assert_eq!(t.join().unwrap().unwrap(), 5);
        assert_eq!(&*sink.lock().unwrap(), b"hello");
    }

    #[test]
    fn input_end_half_closes_the_stream() {
        let (a, mut b) = UnixStream::pair().unwrap();
        spawn_input(&b"data"[..], a, true);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"data");
    }

    #[test]
    fn the_forwarded_set_holds_every_forwarded_signal() {
        let set = forwarded_set();
        assert!(FORWARDED.iter().all(|s| set.contains(*s)));
        assert!(!set.contains(Signal::SIGKILL) && !set.contains(Signal::SIGCHLD));
    }
}
