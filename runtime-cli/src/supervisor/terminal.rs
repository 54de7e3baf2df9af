//! The container's terminal on the host side: a new pty whose master goes over the
//! console socket (runc's SCM_RIGHTS message), or the caller's own terminal in raw mode
//! (`run` in the foreground); and the host ends the relay copies to and from it.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use nix::sys::termios::Termios;

use super::SupervisorError;
use crate::console::{self, HostPty};
use crate::relay::{self, HostIo};

/// The container's terminal.
pub enum Tty {
    /// A pty whose master went over the console socket.
    Pty(HostPty),
    /// The caller's terminal (raw while the container runs; these settings come back).
    Own(Termios),
}

impl std::fmt::Debug for Tty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tty::Pty(p) => write!(f, "Pty({})", p.name),
            Tty::Own(_) => f.write_str("Own"),
        }
    }
}

impl Tty {
    /// Opens the terminal a process with `process.terminal` needs: through `socket`, else
    /// the caller's own when `own_tty`.
    pub fn open(socket: Option<&Path>, own_tty: bool) -> Result<Self, SupervisorError> {
        if let Some(socket) = socket {
            let pty = console::open_pty()?;
            console::send_master(socket, &pty.master, &pty.name)?;
            // Its size changes now reach us as SIGWINCH.
            if let Err(e) = console::take_as_controlling(pty.slave.as_fd()) {
                log::debug!("terminal resize will not be followed: {e}");
            }
            return Ok(Tty::Pty(pty));
        }
        if own_tty {
            let saved = console::make_raw(std::io::stdin().as_fd())
                .map_err(SupervisorError::RawTerminal)?;
            return Ok(Tty::Own(saved));
        }
        Err(SupervisorError::NoConsoleSocket)
    }

    /// The host ends of the terminal for the relay.
    pub fn host_io(&self) -> std::io::Result<HostIo> {
        let (input, output) = match self {
            Tty::Pty(p) => (p.slave.try_clone()?, p.slave.try_clone()?),
            Tty::Own(_) => (
                relay::dup(std::io::stdin())?,
                relay::dup(std::io::stdout())?,
            ),
        };
        Ok(HostIo::Terminal { input, output })
    }

    /// A descriptor whose window size is the container's (for SIGWINCH).
    pub fn window(&self) -> std::io::Result<File> {
        match self {
            Tty::Pty(p) => p.slave.try_clone(),
            Tty::Own(_) => relay::dup(std::io::stdin()),
        }
    }

    /// Gives the caller's terminal its settings back.
    pub fn restore(&self) {
        if let Tty::Own(saved) = self {
            console::restore(std::io::stdin().as_fd(), saved);
        }
    }
}
