//! The VMM process's control socket (`<state>/ctl.sock`): how `start`, `kill`, `pause`,
//! `resume`, `ps` and `events` reach a container's VMM. One request per connection,
//! framed like the agent protocol.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use agent_protocol::{read_frame, write_frame};
use serde::{Deserialize, Serialize};

/// A request to the VMM process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Start the container process (answered once it has exec'd).
    Start,
    /// Send `signal` to the container process (`all`: to every process in it).
    Kill {
        signal: i32,
        all: bool,
    },
    Pause,
    Resume,
    /// Pids of the container's processes, as the guest numbers them.
    Pids,
    /// Resource figures for `events --stats`.
    Stats,
}

/// Memory and CPU figures of the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Resident memory of the VMM process (guest memory it touched plus its own).
    pub memory_rss_bytes: u64,
    /// Guest memory size.
    pub memory_limit_bytes: u64,
    /// CPU time of the VMM process, user + system, in nanoseconds.
    pub cpu_total_ns: u64,
    pub pids: u64,
}

/// The VMM's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    Ok,
    Pids { pids: Vec<i32> },
    Stats { stats: Stats },
    Error { message: String },
}

/// Errors reaching the VMM.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the container's VMM does not answer ({0})")]
    Unreachable(String),
    #[error("{0}")]
    Refused(String),
}

/// Sends `request` to the VMM listening at `socket` and returns its answer.
pub fn call(
    socket: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, ControlError> {
    let unreachable = |e: &dyn std::fmt::Display| ControlError::Unreachable(e.to_string());
    let mut s = vmm::unix_path::connect(socket).map_err(|e| unreachable(&e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| unreachable(&e))?;
    write_frame(&mut s, request).map_err(|e| unreachable(&e))?;
    match read_frame(&mut s).map_err(|e| unreachable(&e))? {
        ControlResponse::Error { message } => Err(ControlError::Refused(message)),
        r => Ok(r),
    }
}

/// Reads one request from an accepted connection.
pub fn read_request(s: &mut UnixStream) -> Option<ControlRequest> {
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    read_frame(s).ok()
}

/// Answers a request.
pub fn respond(s: &mut UnixStream, r: &ControlResponse) {
    let _ = write_frame(s, r);
}
