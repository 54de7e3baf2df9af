//! Small helpers shared by the CLI modules.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, recovering the data of a poisoned one.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// close_range(2)'s flag: mark close-on-exec instead of closing.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// In a child between fork and exec (only async-signal-safe calls): a session of its
/// own, descriptor `keep` placed at `at` and kept across exec, and every descriptor above
/// `at` marked close-on-exec, so nothing the caller let this process inherit reaches the
/// program (neither nix nor rustix wraps close_range(2); older kernels keep them).
pub fn detach_child(keep: std::os::fd::RawFd, at: std::os::fd::RawFd) -> std::io::Result<()> {
    nix::unistd::setsid()?;
    // SAFETY: `keep` is open in this child; `at` belongs to nothing else here. A copy
    // dup2 makes stays open across exec; `keep` itself, when it already is `at`, needs
    // close-on-exec cleared instead.
    let r = unsafe {
        if keep == at {
            libc::fcntl(keep, libc::F_SETFD, 0)
        } else {
            libc::dup2(keep, at)
        }
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: only sets close-on-exec on descriptors of this child.
    unsafe { libc::syscall(libc::SYS_close_range, at + 1, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    Ok(())
}
