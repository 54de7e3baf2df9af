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
pub mod fuzzing;
mod messages;
mod security;

pub use frame::{read_frame, write_frame, FrameError, MAX_FRAME};
pub use messages::*;
pub use security::*;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Guest vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Host vsock port the agent connects to once it is ready.
pub const READY_PORT: u32 = 1025;

/// An error and its chain of causes as one line, the form errors travel in between the
/// agent and the host and reach users: each cause whose text does not already stand in
/// the line is appended after ": ". Line breaks become spaces and other control
/// characters are escaped (a guest can put anything in its error strings).
pub fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    one_line(&line)
}

/// `text` with line breaks as spaces and other control characters escaped.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\r' => out.push(' '),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer {0}")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner\x1b[31m\nred")]
    struct Inner;
    #[derive(Debug, thiserror::Error)]
    #[error("wrapping")]
    struct Wrapping(#[source] std::io::Error);

    #[test]
    fn error_lines_carry_the_chain_once_and_escape_control_characters() {
        let plain = Wrapping(std::io::Error::other("disk on fire"));
        assert_eq!(error_line(&plain), "wrapping: disk on fire");
        assert_eq!(error_line(&Outer(Inner)), "outer inner\\u{1b}[31m red");
    }
}
