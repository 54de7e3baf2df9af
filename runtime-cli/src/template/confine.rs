//! Where a template's VM runs: in a child of the builder, confined as a container's
//! detached VMM is. The child takes a private mount namespace, pivots into the VMM's
//! minimal root (the supervisor's jail) holding only the build's work directory and the
//! boot assets, keeps only the VMM's capabilities and installs the supervisor's seccomp
//! filter before it starts a thread; then it boots the VM and saves it into the work
//! directory. The builder keeps the store: it waits for the child (with a deadline),
//! places what the child wrote, or reports the one line the child sent back. The child
//! is killed when its builder ends.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, signal, SigHandler, Signal};
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
    #[error("resetting SIGCHLD: {0}")]
    Sigchld(#[source] nix::Error),
    #[error("a pid namespace for the template's VM: {0}")]
    PidNamespace(#[source] nix::Error),
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
/// `timeout` has passed, then kills it. As root, the child is the first process of a pid
/// namespace of its own, so its end takes anything it started with it. Must be called
/// while this process has one thread, once per process.
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
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| super::io_err("a pipe for", work)(e.into()))
    };
    let (report, report_w) = pipe()?;
    let (go, go_w) = pipe()?;
    // The child's status is this process's to collect, whatever its caller set.
    // SAFETY: restores the default disposition; no handler code is involved.
    unsafe { signal(Signal::SIGCHLD, SigHandler::SigDfl) }.map_err(ConfineError::Sigchld)?;
    if nix::unistd::geteuid().is_root() {
        nix::sched::unshare(CloneFlags::CLONE_NEWPID).map_err(ConfineError::PidNamespace)?;
    }
    // SAFETY: this process has one thread (checked above), so the child's copy of every
    // lock and allocator state is consistent; the child never returns into the caller
    // (it leaves through `_exit`).
    match unsafe { nix::unistd::fork() }
        .map_err(|e| super::io_err("forking the builder for", work)(e.into()))?
    {
        ForkResult::Child => {
            drop((report, go_w));
            child(report_w, go, || {
                confine(work, assets, mode)?;
                job()
            })
        }
        ForkResult::Parent { child } => {
            drop((report_w, go));
            // The go-ahead: the child has set its death signal by the time it reads it.
            let _ = std::fs::File::from(go_w).write_all(&[1]);
            wait_child(child, report, timeout)
        }
    }
}

/// The child's whole life: its death signal, the builder's go-ahead, its descriptors
/// reduced, `body`, its error line (if any) written to `report`, exit.
fn child(report: OwnedFd, go: OwnedFd, body: impl FnOnce() -> Result<(), TemplateError>) -> ! {
    // The VM goes with its builder. A builder that ended before the death signal was set
    // never sent the go-ahead: its end of the pipe is closed, the read sees EOF.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let mut byte = [0u8; 1];
    if !std::fs::File::from(go)
        .read(&mut byte)
        .is_ok_and(|n| n == 1)
    {
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(1) }
    }
    let outcome = match keep_only_own_descriptors(&report) {
        Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)),
        Err(e) => Ok(Err(super::io_err(
            "closing descriptors in",
            Path::new("/proc/self/fd"),
        )(e))),
    };
    let line = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(crate::logging::error_line(&e)),
        Err(p) => Some(format!("panicked: {}", vmm::event_loop::panic_message(&*p))),
    };
    if let Some(line) = &line {
        let mut f = std::fs::File::from(report);
        let _ = f.write_all(format!("\n{line}\n").as_bytes());
    }
    // SAFETY: ends the child without running the parent's destructors or atexit hooks.
    unsafe { libc::_exit(i32::from(line.is_some())) }
}

/// Leaves the child /dev/null as stdin and stdout, the report pipe as stderr (where a
/// seccomp or panic line goes when runvm logs there) and the log file; every other
/// descriptor (the build lock, the store's directories, the caller's terminal) stays
/// with the builder.
fn keep_only_own_descriptors(report: &OwnedFd) -> std::io::Result<()> {
    let null = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for (from, to) in [
        (null.as_raw_fd(), 0),
        (null.as_raw_fd(), 1),
        (report.as_raw_fd(), 2),
    ] {
        // SAFETY: both descriptors are open in this single-threaded child; `to` is one of
        // its standard descriptors, replaced on purpose.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    drop(null);
    let keep = [
        Some(0),
        Some(1),
        Some(2),
        Some(report.as_raw_fd()),
        crate::logging::file_fd(),
    ];
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open.into_iter().filter(|fd| !keep.contains(&Some(*fd))) {
        // SAFETY: nothing in this child uses these descriptors (they are the builder's);
        // the directory listing's own one is already closed (EBADF, ignored).
        unsafe { libc::close(fd) };
    }
    Ok(())
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
    if !in_time {
        return failed(format!("its VM was not saved within {timeout:?}"));
    }
    // The child's last line says why it failed (earlier ones are what it logged).
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    match (status, last) {
        (Some(WaitStatus::Exited(_, 0)), _) => Ok(()),
        (Some(WaitStatus::Signaled(_, sig, _)), _) => {
            failed(format!("its VMM was killed by {sig}"))
        }
        (_, Some(line)) => Err(TemplateError::Child {
            line: line.trim().to_string(),
        }),
        (Some(WaitStatus::Exited(_, code)), None) => {
            failed(format!("its VMM exited with status {code}"))
        }
        _ => failed("its VMM's end could not be collected".into()),
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
            // The child's end is gone or unusable: its status tells the rest.
            Err(_) => return (String::from_utf8_lossy(&buf).into_owned(), true),
        }
        let mut chunk = [0u8; 512];
        match file.read(&mut chunk) {
            Ok(0) => return (String::from_utf8_lossy(&buf).into_owned(), true),
            Ok(n) => {
                // The last REPORT_LIMIT bytes: the error line comes last.
                buf.extend_from_slice(&chunk[..n]);
                let excess = buf.len().saturating_sub(REPORT_LIMIT);
                buf.drain(..excess);
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
