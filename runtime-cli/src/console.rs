//! Terminals on the host side: the pseudo-terminal whose master goes to the caller over
//! `--console-socket` (SCM_RIGHTS, as runc sends it), raw mode for a caller's own
//! terminal, and window sizes.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios;

/// Errors with terminals.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pseudo-terminal: {0}")]
    Pty(nix::Error),
}

/// A host pseudo-terminal: the master for the caller, the slave for runvm.
#[derive(Debug)]
pub struct HostPty {
    pub master: OwnedFd,
    pub slave: File,
    pub name: String,
}

/// Opens a pseudo-terminal in raw mode (the guest's terminal does the line discipline).
pub fn open_pty() -> Result<HostPty, ConsoleError> {
    let master = nix::pty::posix_openpt(
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
    )
    .map_err(ConsoleError::Pty)?;
    nix::pty::grantpt(&master).map_err(ConsoleError::Pty)?;
    nix::pty::unlockpt(&master).map_err(ConsoleError::Pty)?;
    let name = nix::pty::ptsname_r(&master).map_err(ConsoleError::Pty)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_noctty()
        .open(&name)
        .map_err(|e| {
            ConsoleError::Pty(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
        })?;
    make_raw(slave.as_fd()).map_err(ConsoleError::Pty)?;
    Ok(HostPty {
        master: master.into(),
        slave,
        name,
    })
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
    }
}

/// Puts a terminal in raw mode; returns the settings to restore.
pub fn make_raw(fd: BorrowedFd<'_>) -> nix::Result<termios::Termios> {
    let saved = termios::tcgetattr(fd)?;
    let mut raw = saved.clone();
    termios::cfmakeraw(&mut raw);
    termios::tcsetattr(fd, termios::SetArg::TCSANOW, &raw)?;
    Ok(saved)
}

/// Restores terminal settings saved by [`make_raw`].
pub fn restore(fd: BorrowedFd<'_>, saved: &termios::Termios) {
    let _ = termios::tcsetattr(fd, termios::SetArg::TCSANOW, saved);
}

/// Sends `master` over the Unix socket at `socket`, with the terminal's name as payload.
pub fn send_master(socket: &Path, master: &OwnedFd, name: &str) -> Result<(), ConsoleError> {
    let err = |source| ConsoleError::Socket {
        path: socket.display().to_string(),
        source,
    };
    let s = vmm::unix_path::connect(socket).map_err(err)?;
    let iov = [std::io::IoSlice::new(name.as_bytes())];
    let fds = [master.as_raw_fd()];
    sendmsg::<()>(
        s.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| err(std::io::Error::from(e)))?;
    Ok(())
}

/// The window size of a terminal, as (rows, columns).
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let ws = rustix::termios::tcgetwinsize(fd).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Makes `fd` the controlling terminal of the calling process, which must lead a session:
/// the kernel then sends it SIGWINCH when the terminal's size changes.
pub fn take_as_controlling(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    Ok(rustix::process::ioctl_tiocsctty(fd)?)
}
