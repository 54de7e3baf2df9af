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
use crate::process::{Processes, StartError};
use crate::{init, reaper};

/// Longest wait for a new connection's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// After the init process's status went out, how long the host has to close the control
/// connection before the VM ends anyway.
const FINAL_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What ending means for this agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// PID 1 of a VM: ending powers the VM off.
    Init,
    /// A host process: ending exits.
    Host,
}

fn agent_name() -> String {
    format!("runvm-agent {}", env!("CARGO_PKG_VERSION"))
}

/// Runs the agent as a host process on a Unix socket.
pub fn run_host(path: &Path) -> Result<(), String> {
    reaper::block_sigchld().map_err(|e| format!("blocking SIGCHLD: {e}"))?;
    // Orphans of our processes come back to us, as they would to PID 1.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let procs = Arc::new(Processes::new());
    let p = procs.clone();
    reaper::spawn(move |pid, status| p.reaped(pid, status)).map_err(|e| format!("reaper: {e}"))?;
    let listener =
        Listener::unix(path).map_err(|e| format!("listening on {}: {e}", path.display()))?;
    serve(listener, procs, Role::Host)
}

/// Accepts connections forever.
pub fn serve(listener: Listener, procs: Arc<Processes>, role: Role) -> Result<(), String> {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("accept: {e}")),
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
                procs.attach(&process, kind, s)
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
        let response = dispatch(request, procs);
        if write_frame(&mut stream, &response).is_err() {
            break;
        }
        if shutdown {
            end(role);
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
                end(role);
            }
        }
    }
}

fn dispatch(request: Request, procs: &Arc<Processes>) -> Response {
    let done = |r: Result<(), String>| match r {
        Ok(()) => Response::Ok,
        Err(message) => Response::Error { message },
    };
    match request {
        Request::Create {
            id,
            process,
            stdio,
            init,
            container,
        } => match procs.create(&id, process, stdio, init, container.map(|c| *c)) {
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
            Err(message) => Response::Error { message },
        },
        Request::Pids => Response::Pids { pids: procs.pids() },
        Request::Shutdown => Response::Ok,
    }
}

fn start_error(e: StartError) -> Response {
    match e {
        StartError::Exec { status, message } => Response::ExecFailed { status, message },
        StartError::Other(message) => Response::Error { message },
    }
}

fn end(role: Role) -> ! {
    match role {
        Role::Init => init::power_off(),
        Role::Host => std::process::exit(0),
    }
}
