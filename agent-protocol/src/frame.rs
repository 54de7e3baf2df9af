//! Length-prefixed JSON frames.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame either side accepts (the length prefix excluded).
pub const MAX_FRAME: usize = 1 << 20;

/// Errors reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed")]
    Closed,
    #[error("frame truncated: {got} of {want} bytes")]
    Truncated { got: usize, want: usize },
    #[error("frame of {len} bytes is larger than the {max} byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Json(#[from] serde_json::Error),
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
}

/// Writes `msg` as one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads as many bytes as arrive, up to `buf.len()`; returns how many.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame and decodes it as `T`. A connection closed before any byte of the
/// frame gives [`FrameError::Closed`].
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    match read_full(r, &mut len)? {
        0 => return Err(FrameError::Closed),
        4 => {}
        got => return Err(FrameError::Truncated { got, want: 4 }),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body)?;
    if got < len {
        return Err(FrameError::Truncated { got, want: len });
    }
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hello, Request, Response, StreamKind};

    #[test]
    fn round_trip_of_every_kind() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Hello::Control { version: 1 }).unwrap();
        write_frame(
            &mut buf,
            &Hello::Stream {
                version: 1,
                process: "p".into(),
                stream: StreamKind::Stderr,
            },
        )
        .unwrap();
        write_frame(
            &mut buf,
            &Request::Signal {
                id: "p".into(),
                signal: 15,
                all: false,
            },
        )
        .unwrap();
        write_frame(&mut buf, &Response::Exited { status: 143 }).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame::<_, Hello>(&mut r).unwrap(),
            Hello::Control { version: 1 }
        );
        assert!(matches!(
            read_frame::<_, Hello>(&mut r).unwrap(),
            Hello::Stream {
                stream: StreamKind::Stderr,
                ..
            }
        ));
        assert_eq!(
            read_frame::<_, Request>(&mut r).unwrap(),
            Request::Signal {
                id: "p".into(),
                signal: 15,
                all: false
            }
        );
        assert_eq!(
            read_frame::<_, Response>(&mut r).unwrap(),
            Response::Exited { status: 143 }
        );
        assert!(matches!(
            read_frame::<_, Response>(&mut r),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn truncated_frames_are_reported() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Response::Ok).unwrap();
        for cut in [1, 3, 5, buf.len() - 1] {
            let mut r = &buf[..cut];
            assert!(
                matches!(
                    read_frame::<_, Response>(&mut r),
                    Err(FrameError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_them() {
        let mut r = &[0xff, 0xff, 0xff, 0xff, b'{'][..];
        assert!(matches!(
            read_frame::<_, Response>(&mut r),
            Err(FrameError::TooLarge {
                len: 0xffff_ffff,
                ..
            })
        ));
        let big = "x".repeat(MAX_FRAME + 1);
        let e = write_frame(&mut Vec::new(), &Response::Error { message: big }).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }));
    }

    #[test]
    fn garbage_is_a_json_error() {
        let mut buf = 5u32.to_be_bytes().to_vec();
        buf.extend_from_slice(b"hello");
        assert!(matches!(
            read_frame::<_, Request>(&mut &buf[..]),
            Err(FrameError::Json(_))
        ));
        let mut buf = Vec::new();
        write_frame(&mut buf, &serde_json::json!({"op": "format_disk"})).unwrap();
        assert!(matches!(
            read_frame::<_, Request>(&mut &buf[..]),
            Err(FrameError::Json(_))
        ));
    }
}
