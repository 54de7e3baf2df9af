//! Serving host connections: each accepted connection gets a thread, reads its hello and
//! becomes either a control connection (requests answered one by one) or a stdio stream
//! handed to its process.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent_protocol::{
    check_version, read_frame, write_frame, FrameError, Hello, Request, Response, PROTOCOL_VERSION,
};

use crate::conn::Listener;
use crate::power::Role;
use crate::process::{ProcessError, Processes, StartError};
use crate::reaper;

/// Longest wait for a new connection's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// After the init process's status went out, how long the host has to close the control
/// connection before the VM ends anyway.
const FINAL_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the agent stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("blocking SIGCHLD: {0}")]
    Signals(#[source] nix::Error),
    #[error("reaper thread: {0}")]
    Reaper(#[source] std::io::Error),
    #[error("listening on {path}: {source}")]
    Listen {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("accept: {0}")]
    Accept(#[source] std::io::Error),
}

fn agent_name() -> String {
    format!("runvm-agent {}", env!("CARGO_PKG_VERSION"))
}

/// Runs the agent as a host process on a Unix socket.
pub fn run_host(path: &Path) -> Result<(), ServeError> {
    reaper::block_sigchld().map_err(ServeError::Signals)?;
    // Orphans of our processes come back to us, as they would to PID 1.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let procs = Arc::new(Processes::new());
    let p = procs.clone();
    reaper::spawn(move |pid, status| p.reaped(pid, status)).map_err(ServeError::Reaper)?;
    let listener = Listener::unix(path).map_err(|source| ServeError::Listen {
        path: path.to_path_buf(),
        source,
    })?;
    serve(listener, procs, Role::Host)
}

/// Accepts connections forever.
pub fn serve(listener: Listener, procs: Arc<Processes>, role: Role) -> Result<(), ServeError> {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ServeError::Accept(e)),
        };
        let procs = procs.clone();
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || handle(stream, &procs, role));
        if let Err(e) = spawned {
            eprintln!("runvm-agent: connection thread: {e}");
        }
    }
}

fn handle(mut stream: UnixStream, procs: &Arc<Processes>, role: Role) {
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    let hello: Hello = match read_frame(&mut stream) {
        Ok(h) => h,
        Err(e) => {
            let _ = write_frame(
                &mut stream,
                &Response::Error {
                    message: format!("bad hello: {e}"),
                },
            );
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    match hello {
        Hello::Control { version } => {
            if let Err(message) = check_version(version) {
                let _ = write_frame(&mut stream, &Response::Error { message });
                return;
            }
            let welcome = Response::Welcome {
                version: PROTOCOL_VERSION,
                agent: agent_name(),
            };
            if write_frame(&mut stream, &welcome).is_ok() {
                control_loop(stream, procs, role);
            }
        }
        Hello::Stream {
            version,
            process,
            stream: kind,
        } => {
            let result = check_version(version).and_then(|()| {
                let s = stream.try_clone().map_err(|e| e.to_string())?;
                procs
                    .attach(&process, kind, s)
                    .map_err(|e| agent_protocol::error_line(&e))
            });
            if let Err(message) = result {
                let _ = write_frame(&mut stream, &Response::Error { message });
            }
        }
        Hello::Ready { .. } => {
            let _ = write_frame(
                &mut stream,
                &Response::Error {
                    message: "ready is sent by the agent, not to it".into(),
                },
            );
        }
    }
}

fn control_loop(mut stream: UnixStream, procs: &Arc<Processes>, role: Role) {
    loop {
        let request: Request = match read_frame(&mut stream) {
            Ok(r) => r,
            Err(FrameError::Json(e)) => {
                // The frame was read whole: answer and carry on.
                if write_frame(
                    &mut stream,
                    &Response::Error {
                        message: format!("malformed request: {e}"),
                    },
                )
                .is_err()
                {
                    break;
                }
                continue;
            }
            Err(FrameError::Closed) => break,
            Err(e) => {
                let _ = write_frame(
                    &mut stream,
                    &Response::Error {
                        message: e.to_string(),
                    },
                );
                break;
            }
        };
        let shutdown = matches!(request, Request::Shutdown);
        let waited_init = match &request {
            Request::Wait { id } => Some(id.clone()),
            _ => None,
        };
        let stall = test_faults::applies(&request);
        let response = dispatch(request, procs);
        if stall {
            test_faults::forever();
        }
        test_faults::note(&response);
        if write_frame(&mut stream, &response).is_err() {
            break;
        }
        if shutdown {
            role.end();
        }
        if let Some(id) = waited_init {
            if matches!(response, Response::Exited { .. })
                && procs.is_finished_init(&id)
                && role == Role::Init
            {
                // The host has the container's status; once it hangs up (or goes quiet),
                // the VM's work is done.
                let _ = stream.set_read_timeout(Some(FINAL_READ_TIMEOUT));
                let mut buf = [0u8; 1];
                let _ = std::io::Read::read(&mut stream, &mut buf);
                role.end();
            }
        }
    }
}

mod test_faults {
    //! Faults the host's tests inject: an agent that hangs proves that no host command
    //! waits on the guest without a deadline; one that dies proves the host cleans up
    //! after a guest that is gone.
    //!
    //! Faults the test suites ask for through `RUNVM_AGENT_TEST_FAULT` (a kernel
    //! command-line word the agent takes as its environment): once a process started,
    //! `stall` leaves every request but waits unanswered, and `crash` ends the agent a
    //! second later, which in a VM panics the guest kernel (its init exited);
    //! `stall-create` never answers a `create` (the agent is ready, the container never
    //! is).
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use agent_protocol::{Request, Response};

    static STARTED: AtomicBool = AtomicBool::new(false);

    fn fault() -> Option<String> {
        std::env::var("RUNVM_AGENT_TEST_FAULT").ok()
    }

    /// Whether `request` goes unanswered.
    pub fn applies(request: &Request) -> bool {
        match fault().as_deref() {
            Some("stall") => {
                STARTED.load(Ordering::SeqCst) && !matches!(request, Request::Wait { .. })
            }
            Some("stall-create") => matches!(request, Request::Create { .. }),
            _ => false,
        }
    }

    /// Records that a process started (and starts a `crash`).
    pub fn note(response: &Response) {
        let started = matches!(response, Response::Started { .. });
        if started && !STARTED.swap(true, Ordering::SeqCst) && fault().as_deref() == Some("crash") {
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_secs(1));
                eprintln!("runvm-agent: test fault: the agent ends");
                std::process::exit(70);
            });
        }
    }

    /// Blocks this connection's thread for good.
    pub fn forever() -> ! {
        loop {
            std::thread::park();
        }
    }
}

fn error(e: &(dyn std::error::Error + 'static)) -> Response {
    Response::Error {
        message: agent_protocol::error_line(e),
    }
}

fn dispatch(request: Request, procs: &Arc<Processes>) -> Response {
    let done = |r: Result<(), ProcessError>| match r {
        Ok(()) => Response::Ok,
        Err(e) => error(&e),
    };
    match request {
        Request::Create {
            id,
            process,
            stdio,
            init,
            container,
        } => match procs.create(&id, *process, stdio, init, container.map(|c| *c)) {
            Ok(()) => Response::Ok,
            Err(e) => start_error(e),
        },
        Request::Start { id } => match procs.start(&id) {
            Ok(pid) => Response::Started { pid },
            Err(e) => start_error(e),
        },
        Request::Signal { id, signal, all } => done(procs.signal(&id, signal, all)),
        Request::Resize { id, rows, cols } => done(procs.resize(&id, rows, cols)),
        Request::CloseStdin { id } => done(procs.close_stdin(&id)),
        Request::Wait { id } => match procs.wait(&id) {
            Ok(status) => Response::Exited { status },
            Err(e) => error(&e),
        },
        Request::Pids => Response::Pids { pids: procs.pids() },
        Request::Network { config } => match crate::network::configure(&config) {
            Ok(()) => Response::Ok,
            Err(e) => error(&e),
        },
        Request::Identity {
            entropy,
            realtime_ns,
            hostname,
        } => match crate::identity::apply(&entropy, realtime_ns, hostname.as_deref()) {
            Ok(()) => Response::Ok,
            Err(e) => error(&e),
        },
        Request::Shutdown => Response::Ok,
    }
}

fn start_error(e: StartError) -> Response {
    match e {
        StartError::Exec(e) => Response::ExecFailed {
            status: e.status,
            message: agent_protocol::one_line(&e.message),
        },
        StartError::Process(e) => error(&e),
    }
}
