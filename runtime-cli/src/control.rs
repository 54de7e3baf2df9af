//! The VMM process's control socket (`<state>/ctl.sock`): how `start`, `kill`, `pause`,
//! `resume`, `ps` and `events` reach a container's VMM. One request per connection,
//! framed like the agent protocol; a request that hands the VMM a descriptor (the tap of
//! [`ControlRequest::Network`]) sends it right after, with one byte, as SCM_RIGHTS.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
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
    /// Attach the tap that follows as SCM_RIGHTS to the network device, and configure
    /// the guest's interface as `config` says.
    Network {
        config: agent_protocol::NetworkConfig,
    },
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
    call_then(socket, request, timeout, |_| Ok(()))
}

/// Like [`call`], handing the VMM the descriptor `fd` with the request.
pub fn call_with_fd(
    socket: &Path,
    request: &ControlRequest,
    fd: BorrowedFd<'_>,
    timeout: Duration,
) -> Result<ControlResponse, ControlError> {
    call_then(socket, request, timeout, |s| {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let fds = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            s.as_raw_fd(),
            &[IoSlice::new(b"F")],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .map(drop)
        .map_err(std::io::Error::from)
    })
}

fn call_then(
    socket: &Path,
    request: &ControlRequest,
    timeout: Duration,
    after_request: impl FnOnce(&UnixStream) -> std::io::Result<()>,
) -> Result<ControlResponse, ControlError> {
    let unreachable = |e: &dyn std::fmt::Display| ControlError::Unreachable(e.to_string());
    let mut s = vmm::unix_path::connect(socket).map_err(|e| unreachable(&e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| unreachable(&e))?;
    write_frame(&mut s, request).map_err(|e| unreachable(&e))?;
    after_request(&s).map_err(|e| unreachable(&e))?;
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

/// The descriptor that follows a request on `s` (within the read timeout already set).
pub fn receive_fd(s: &UnixStream) -> Option<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    let mut received = Vec::new();
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel just installed these descriptors in this process; nothing
            // else owns them.
            received.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    // One descriptor is expected; any others are closed here.
    received.into_iter().next()
}

/// Answers a request.
pub fn respond(s: &mut UnixStream, r: &ControlResponse) {
    let _ = write_frame(s, r);
}
