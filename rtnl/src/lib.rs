//! A small synchronous rtnetlink client, for both sides of runvm's networking: the host
//! reads a container's interface and sets up its tap and traffic control in the
//! container's network namespace, the guest agent configures the VM's interface.
//!
//! Messages are netlink-packet-route's; the socket is netlink-sys's. Every request asks
//! for the kernel's acknowledgement and waits for it with a deadline, so a failure is
//! always reported with the operation that failed. A socket belongs to the network
//! namespace of the thread that made it.

pub mod link;

use std::io;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

pub use link::{Link, LinkChange, RouteEntry};
pub use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
pub use netlink_packet_route as packet;

/// Longest wait for the kernel's answer to one request.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{op}: no answer from the kernel within {ANSWER_TIMEOUT:?}")]
    Timeout { op: String },
    #[error("{op}: malformed answer: {reason}")]
    Decode { op: String, reason: String },
}

impl RtnlError {
    /// The errno the kernel answered, if it refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtnlError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A route netlink socket in the calling thread's network namespace.
#[derive(Debug)]
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    /// Opens and binds the socket.
    pub fn new() -> Result<Self, RtnlError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
        socket.bind_auto().map_err(RtnlError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(RtnlError::Socket)?;
        set_receive_timeout(&socket, ANSWER_TIMEOUT).map_err(RtnlError::Socket)?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends `msg` with `flags` (plus request and ack) and waits for the kernel's ack.
    pub fn request(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), RtnlError> {
        let seq = self.send(op, msg, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        let mut done = false;
        self.receive(op, seq, |m| match m {
            NetlinkPayload::Error(e) if e.code.is_none() => {
                done = true;
                Ok(true)
            }
            NetlinkPayload::Error(e) => Err(RtnlError::Kernel {
                op: op.into(),
                source: e.to_io(),
            }),
            _ => Ok(false),
        })?;
        debug_assert!(done);
        Ok(())
    }

    /// Sends the dump request `msg` and returns every answer.
    pub fn dump(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        let seq = self.send(op, msg, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        self.receive(op, seq, |m| match m {
            // A dump the kernel could not finish ends with its error in DONE.
            NetlinkPayload::Done(d) if d.code < 0 => Err(RtnlError::Kernel {
                op: op.into(),
                source: io::Error::from_raw_os_error(-d.code),
            }),
            NetlinkPayload::Done(_) => Ok(true),
            NetlinkPayload::Error(e) if e.code.is_some() => Err(RtnlError::Kernel {
                op: op.into(),
                source: e.to_io(),
            }),
            NetlinkPayload::InnerMessage(inner) => {
                out.push(inner);
                Ok(false)
            }
            _ => Ok(false),
        })?;
        Ok(out)
    }

    fn send(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, RtnlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.header.length as usize];
        packet.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .map_err(|source| RtnlError::Kernel {
                op: op.into(),
                source,
            })?;
        Ok(self.seq)
    }

    /// Reads answers to request `seq`, handing each to `f` until it returns true.
    fn receive(
        &mut self,
        op: &str,
        seq: u32,
        mut f: impl FnMut(NetlinkPayload<RouteNetlinkMessage>) -> Result<bool, RtnlError>,
    ) -> Result<(), RtnlError> {
        loop {
            let (buf, _) = self.socket.recv_from_full().map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    RtnlError::Timeout { op: op.into() }
                } else {
                    RtnlError::Socket(e)
                }
            })?;
            let mut at = 0;
            while at < buf.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[at..]).map_err(
                    |e| RtnlError::Decode {
                        op: op.into(),
                        reason: e.to_string(),
                    },
                )?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                at += len.next_multiple_of(4);
                if msg.header.sequence_number != seq {
                    continue;
                }
                if f(msg.payload)? {
                    return Ok(());
                }
            }
        }
    }
}

fn set_receive_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: SO_RCVTIMEO reads one `timeval` of the given size from a valid pointer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
