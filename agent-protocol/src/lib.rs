//! The protocol between runvm's host side and its guest agent.
//!
//! Every connection goes to the agent's one listening port (vsock port [`AGENT_PORT`] in a
//! VM, a Unix socket in host mode) and starts with a [`Hello`] frame saying what it is:
//! a control connection (requests and responses, one at a time) or one stdio stream of a
//! process (raw bytes after the hello). When it is ready, an agent in a VM also connects to
//! host port [`READY_PORT`] and sends [`Hello::Ready`].
//!
//! Frames are a 4-byte big-endian length and that many bytes of JSON, at most
//! [`MAX_FRAME`] bytes.

mod frame;
mod messages;

pub use frame::{read_frame, write_frame, FrameError, MAX_FRAME};
pub use messages::*;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Guest vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Host vsock port the agent connects to once it is ready.
pub const READY_PORT: u32 = 1025;

/// Checks a peer's version against ours.
pub fn check_version(theirs: u32) -> Result<(), String> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(format!(
            "unsupported agent protocol version {theirs} (this side speaks {PROTOCOL_VERSION})"
        ))
    }
}
