//! Why a process request fails: what the host asked that cannot be done, and why a
//! process cannot be created or started.

use agent_protocol::StreamKind;

use crate::container::ShareError;
use crate::spawn::SpawnError;

/// What the host asked that cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("invalid process id {0:?}")]
    BadId(String),
    #[error("process {0} already exists")]
    Exists(String),
    #[error("an init process already exists")]
    InitExists,
    #[error("only the init process creates the container")]
    NotInit,
    #[error("no process {0}")]
    NoProcess(String),
    #[error("process {0} already started")]
    Started(String),
    #[error("process {0} has not started")]
    NotStarted(String),
    #[error("process {0} has exited")]
    Exited(String),
    #[error("process {id} does not expect a {kind:?} stream")]
    UnexpectedStream { id: String, kind: StreamKind },
    #[error("process {id}: streams {missing:?} never attached")]
    NeverAttached {
        id: String,
        missing: Vec<StreamKind>,
    },
    #[error("process {0} has no terminal")]
    NoTerminal(String),
    #[error("process {0} reads a terminal, which cannot be closed apart")]
    TerminalInput(String),
    #[error("another process already has pid {0}")]
    PidReuse(i32),
    #[error("signal {signal} to process {id}: {source}")]
    Signal {
        id: String,
        signal: i32,
        #[source]
        source: nix::Error,
    },
    #[error("resizing the terminal of process {id}: {source}")]
    Resize {
        id: String,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("stdio of process {id}: {source}")]
    Stdio {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Share(#[from] ShareError),
}

/// Why a process cannot be created or started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The process cannot run; the status stands for it.
    #[error(transparent)]
    Exec(#[from] SpawnError),
    #[error(transparent)]
    Process(#[from] ProcessError),
}
