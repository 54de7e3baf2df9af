//! The ready pipe between `create` and the VMM process it starts: the VMM writes one
//! line once the container is prepared (`ok`) or could not be (`error: <why>`), and
//! `create` reads it. End of file without a line means the VMM died first.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

/// The VMM's end of the pipe.
#[derive(Debug)]
pub struct ReadyWriter(File);

/// What the VMM reported.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadyError {
    /// The VMM could not prepare the container; its reason.
    #[error("{0}")]
    Failed(String),
    /// The pipe closed without a report.
    #[error("the VMM process ended before the container was ready")]
    Closed,
}

impl ReadyWriter {
    /// The write end passed to the VMM as descriptor `fd` (`--ready-fd`).
    ///
    /// # Safety
    /// `fd` must be an open descriptor this process owns and uses for nothing else.
    pub unsafe fn from_raw_fd(fd: i32) -> Self {
        // SAFETY: the caller guarantees `fd` is ours alone.
        ReadyWriter(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Reports success.
    pub fn ok(mut self) {
        let _ = self.0.write_all(b"ok\n");
    }

    /// Reports a failure, as one line.
    pub fn fail(mut self, reason: &str) {
        let line = format!("error: {}\n", reason.replace('\n', " "));
        let _ = self.0.write_all(line.as_bytes());
    }
}

/// `create`'s end of the pipe.
#[derive(Debug)]
pub struct ReadyReader(File);

impl ReadyReader {
    /// A new pipe: the reader, and the write end to hand to the VMM (close-on-exec; the
    /// spawner moves it to the descriptor the VMM expects).
    pub fn pipe() -> std::io::Result<(Self, OwnedFd)> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok((ReadyReader(File::from(r)), w))
    }

    /// Waits for the report (every copy of the write end must be closed but the VMM's).
    pub fn wait(mut self) -> Result<(), ReadyError> {
        let mut report = String::new();
        let _ = (&mut self.0).take(64 * 1024).read_to_string(&mut report);
        match report.lines().next() {
            Some("ok") => Ok(()),
            Some(line) => Err(ReadyError::Failed(
                line.trim_start_matches("error: ").to_string(),
            )),
            None => Err(ReadyError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn pair() -> (ReadyReader, ReadyWriter) {
        let (r, w) = ReadyReader::pipe().unwrap();
        // SAFETY: the descriptor was just created and is handed over whole.
        let w = unsafe { ReadyWriter::from_raw_fd(w.into_raw_fd()) };
        (r, w)
    }

    #[test]
    fn reports_travel_as_one_line() {
        let (r, w) = pair();
        w.ok();
        assert_eq!(r.wait(), Ok(()));
        let (r, w) = pair();
        w.fail("no kernel\nat all");
        assert_eq!(r.wait(), Err(ReadyError::Failed("no kernel at all".into())));
        let (r, w) = pair();
        drop(w);
        assert_eq!(r.wait(), Err(ReadyError::Closed));
    }
}
