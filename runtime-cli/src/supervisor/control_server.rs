//! The VMM's side of the control socket (`<state>/ctl.sock`): one thread per connection,
//! so a slow request (a `start` waiting for the exec, a guest that does not answer) never
//! holds up another. `start` goes to the main thread, which owns the container's process;
//! the rest is answered here, from the VM handle or through the agent with a deadline.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::agent_client::{ClientError, Control};
use crate::control::{self, ControlRequest, ControlResponse, Stats};

use super::{Shared, INIT_ID};

/// Longest wait for the agent's answer to a kill, pids or stats request.
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a control connection asks of the main thread.
pub(super) enum MainRequest {
    /// Start the container's process; the answer goes back on the sender.
    Start(mpsc::Sender<ControlResponse>),
    /// The VM ended (or was stopped).
    Ended,
}

fn error(message: impl std::fmt::Display) -> ControlResponse {
    ControlResponse::Error {
        message: message.to_string(),
    }
}

/// Most control connections served at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 64;

/// Whether the peer of `s` runs as this process's user (root): the socket is 0600 in a
/// 0700 directory already, this holds even if someone loosens those.
fn trusted_peer(s: &UnixStream) -> bool {
    match nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials) {
        Ok(cred) => cred.uid() == nix::unistd::geteuid().as_raw(),
        Err(_) => false,
    }
}

/// Accepts connections until the listener fails (the VMM exits first).
pub(super) fn serve(listener: UnixListener, shared: Arc<Shared>, main: mpsc::Sender<MainRequest>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        if !trusted_peer(&stream) {
            log::warn!("control socket: refused a peer of another user");
            continue;
        }
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            log::warn!("control socket: {MAX_CONNECTIONS} connections open, refusing one");
            continue;
        }
        let (shared, main, done) = (shared.clone(), main.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("ctl-conn".into())
            .spawn(move || {
                handle(stream, &shared, &main);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            log::warn!("control socket: connection thread: {e}");
        }
    }
}

fn handle(mut s: UnixStream, shared: &Shared, main: &mpsc::Sender<MainRequest>) {
    let Some(req) = control::read_request(&mut s) else {
        return;
    };
    let response = match req {
        ControlRequest::Start => start(main),
        ControlRequest::Kill { signal, all } => kill(shared, signal, all),
        ControlRequest::Pause => with_vm(shared, |vm| vm.pause()),
        ControlRequest::Resume => with_vm(shared, |vm| vm.resume()),
        ControlRequest::Pids => agent(shared, |c| {
            c.pids().map(|pids| ControlResponse::Pids { pids })
        }),
        ControlRequest::Network { config } => super::network::attach_received(shared, &s, &config),
        ControlRequest::Stats => {
            let pids = agent(shared, |c| {
                c.pids().map(|p| ControlResponse::Pids { pids: p })
            });
            let pids = match pids {
                ControlResponse::Pids { pids } => pids.len() as u64,
                _ => 0,
            };
            ControlResponse::Stats {
                stats: vmm_stats(shared.mem_mib, pids),
            }
        }
    };
    control::respond(&mut s, &response);
}

fn start(main: &mpsc::Sender<MainRequest>) -> ControlResponse {
    let (tx, rx) = mpsc::channel();
    if main.send(MainRequest::Start(tx)).is_err() {
        return error("the container is ending");
    }
    rx.recv()
        .unwrap_or_else(|_| error("the container ended before it started"))
}

fn kill(shared: &Shared, signal: i32, all: bool) -> ControlResponse {
    if signal == libc::SIGKILL || !shared.is_started() {
        // SIGKILL takes the whole VM down; so does any signal before the process exists
        // (nothing else could receive it).
        shared.stopper.stop(signal);
        return ControlResponse::Ok;
    }
    agent(shared, |c| {
        c.signal(INIT_ID, signal, all).map(|()| ControlResponse::Ok)
    })
}

fn with_vm(shared: &Shared, f: impl FnOnce(&vmm::VmHandle)) -> ControlResponse {
    match shared.stopper.vm() {
        Some(vm) => {
            f(&vm);
            ControlResponse::Ok
        }
        None => error("the VM is not running"),
    }
}

/// One agent call on a connection of its own, with a deadline.
fn agent(
    shared: &Shared,
    f: impl FnOnce(&mut Control) -> Result<ControlResponse, ClientError>,
) -> ControlResponse {
    let Some(client) = shared.client.get() else {
        return error("the guest agent is not up yet");
    };
    match client.control_within(AGENT_CALL_TIMEOUT) {
        Ok(mut c) => f(&mut c).unwrap_or_else(error),
        Err(e) => error(e),
    }
}

/// Memory and CPU of the VMM process (which holds the guest's memory).
fn vmm_stats(mem_mib: u64, pids: u64) -> Stats {
    let stat = procfs::process::Process::myself().and_then(|p| p.stat());
    let (rss_bytes, ticks) = match stat {
        Ok(s) => (s.rss * procfs::page_size(), s.utime + s.stime),
        Err(_) => (0, 0),
    };
    let hz = procfs::ticks_per_second().max(1);
    Stats {
        memory_rss_bytes: rss_bytes,
        memory_limit_bytes: mem_mib << 20,
        cpu_total_ns: ticks * 1_000_000_000 / hz,
        pids,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stats_of_this_process_are_plausible() {
        let s = super::vmm_stats(128, 3);
        assert!(s.memory_rss_bytes > 1 << 20, "{s:?}");
        assert_eq!(s.memory_limit_bytes, 128 << 20);
        assert_eq!(s.pids, 3);
    }
}
