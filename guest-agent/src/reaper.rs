//! Reaping: SIGCHLD is blocked in every thread and waited for by one reaper thread, which
//! collects every exited child (the agent's own and, as PID 1 or subreaper, orphans) and
//! hands each status to a callback.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Blocks SIGCHLD in the calling thread; call before any other thread exists so that all
/// inherit the mask (children get a clean mask from `exec`'s setup in std).
pub fn block_sigchld() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block()
}

/// The shell convention for an exit status: the code, or 128 + the signal.
pub fn exit_status(ws: WaitStatus) -> Option<(Pid, i32)> {
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid, code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, 128 + sig as i32)),
        _ => None,
    }
}

/// Starts the reaper thread; `on_exit(pid, status)` runs for every reaped child.
pub fn spawn<F>(on_exit: F) -> std::io::Result<()>
where
    F: Fn(i32, i32) + Send + 'static,
{
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || {
            let mut set = SigSet::empty();
            set.add(Signal::SIGCHLD);
            loop {
                // Reap everything first: children may have exited before we started waiting.
                loop {
                    match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::StillAlive) | Err(_) => break,
                        Ok(ws) => {
                            if let Some((pid, status)) = exit_status(ws) {
                                on_exit(pid.as_raw(), status);
                            }
                        }
                    }
                }
                let _ = set.wait();
            }
        })?;
    Ok(())
}
