//! Where a template's VM runs: in a child of the builder, confined as a container's
//! detached VMM is. The child takes a private mount namespace, pivots into the VMM's
//! minimal root (the supervisor's jail) holding only the build's work directory and the
//! boot assets, keeps only the VMM's capabilities and installs the supervisor's seccomp
//! filter before it starts a thread; then it boots the VM and saves it into the work
//! directory. The builder keeps the store: it waits for the child (with a deadline),
//! places what the child wrote, or reports the one line the child sent back. The child
//! is killed when its builder ends.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use vmm::seccomp::{SeccompError, SeccompMode, ThreadKind};

use super::TemplateError;
use crate::share::ShareError;
use crate::supervisor::jail::{self, JailError};
use crate::supervisor::privileges::{self, PrivilegeError};

/// The most the child's report may hold.
const REPORT_LIMIT: usize = 4096;

/// Why the child could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("the builder has {0} threads: it must fork with one")]
    Threads(usize),
    #[error(transparent)]
    Namespace(#[from] ShareError),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Runs `job` in a confined child whose root holds `work` and `assets` alone (absolute
/// paths, seen at the same paths inside), under seccomp `mode`; waits for it until
/// `timeout` has passed, then kills it. Must be called while this process has one thread.
pub fn run_confined(
    work: &Path,
    assets: &[&Path],
    mode: SeccompMode,
    timeout: Duration,
    job: impl FnOnce() -> Result<(), TemplateError>,
) -> Result<(), TemplateError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(ConfineError::Threads(threads).into());
    }
    let builder = nix::unistd::getpid();
    let (report, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| super::io_err("a pipe for", work)(e.into()))?;
    // SAFETY: this process has one thread (checked above), so the child's copy of every
    // lock and allocator state is consistent; the child never returns into the caller
    // (it leaves through `_exit`).
    match unsafe { nix::unistd::fork() }
        .map_err(|e| super::io_err("forking the builder for", work)(e.into()))?
    {
        ForkResult::Child => {
            drop(report);
            child(report_w, || {
                // The VM goes with its builder, whatever ends the builder.
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                if nix::unistd::getppid() != builder {
                    return Err(TemplateError::Builder {
                        reason: "its builder ended".into(),
                    });
                }
                confine(work, assets, mode)?;
                job()
            })
        }
        ForkResult::Parent { child } => {
            drop(report_w);
            wait_child(child, report, timeout)
        }
    }
}

/// The child's whole life: `body`, its error line (if any) written to `report`, exit.
fn child(report: OwnedFd, body: impl FnOnce() -> Result<(), TemplateError>) -> ! {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    let line = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(crate::logging::error_line(&e)),
        Err(p) => Some(format!("panicked: {}", panic_text(&*p))),
    };
    if let Some(line) = &line {
        let mut f = std::fs::File::from(report);
        let _ = std::io::Write::write_all(&mut f, line.as_bytes());
    }
    // SAFETY: ends the child without running the parent's destructors or atexit hooks.
    unsafe { libc::_exit(i32::from(line.is_some())) }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Confines this (single-threaded) child: as root, its own mount namespace, the jail,
/// the VMM's capabilities; in any case the supervisor's filter.
fn confine(work: &Path, assets: &[&Path], mode: SeccompMode) -> Result<(), ConfineError> {
    if nix::unistd::geteuid().is_root() {
        crate::share::private_mount_namespace()?;
        jail::enter(&jail::JailPlan {
            state_dir: work,
            files: assets.to_vec(),
        })?;
        privileges::drop_privileges()?;
    }
    vmm::seccomp::install(ThreadKind::Supervisor, mode)?;
    Ok(())
}

/// Reads the child's report until it closes (it exits) or `timeout` passes (it is
/// killed), then reaps it.
fn wait_child(child: Pid, report: OwnedFd, timeout: Duration) -> Result<(), TemplateError> {
    let deadline = Instant::now() + timeout;
    let (text, in_time) = read_report(report, deadline);
    if !in_time {
        let _ = kill(child, Signal::SIGKILL);
    }
    let status = reap(child, deadline + Duration::from_secs(10));
    let failed = |reason: String| Err(TemplateError::Builder { reason });
    match (in_time, status) {
        (false, _) => failed(format!("its VM was not saved within {timeout:?}")),
        (true, _) if !text.is_empty() => Err(TemplateError::Child { line: text }),
        (true, Some(WaitStatus::Exited(_, 0))) => Ok(()),
        (true, Some(WaitStatus::Exited(_, code))) => {
            failed(format!("its VMM exited with status {code}"))
        }
        (true, Some(WaitStatus::Signaled(_, sig, _))) => {
            failed(format!("its VMM was killed by {sig}"))
        }
        (true, _) => failed("its VMM did not end".into()),
    }
}

/// What the child wrote (at most [`REPORT_LIMIT`] bytes), and whether it closed its end
/// before `deadline`.
fn read_report(report: OwnedFd, deadline: Instant) -> (String, bool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut buf = Vec::new();
    let mut file = std::fs::File::from(report);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (String::from_utf8_lossy(&buf).into_owned(), false);
        }
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return (String::from_utf8_lossy(&buf).into_owned(), false),
        }
        let mut chunk = [0u8; 512];
        match file.read(&mut chunk) {
            Ok(0) => return (String::from_utf8_lossy(&buf).trim().to_string(), true),
            Ok(n) => {
                let room = REPORT_LIMIT.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (String::from_utf8_lossy(&buf).into_owned(), true),
        }
    }
}

/// Reaps `child`, killing it if it has not ended by `deadline`.
fn reap(child: Pid, deadline: Instant) -> Option<WaitStatus> {
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(WaitStatus::StillAlive) => {
                let _ = kill(child, Signal::SIGKILL);
                return waitpid(child, None).ok();
            }
            Ok(status) => return Some(status),
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}
