//! The Unix-socket vsock backend. Host programs reach guest port P by connecting to the
//! VM's socket and sending `CONNECT <P>\n` (answered `OK <host port>\n` once the guest
//! accepts); guest connections to host port P are connected to the Unix socket
//! `<socket>_<P>`. The muxer owns the listening socket and every connection.

pub mod connection;
pub mod muxer;

pub use muxer::{MuxerError, VsockMuxer, MAX_BUFFERED};
