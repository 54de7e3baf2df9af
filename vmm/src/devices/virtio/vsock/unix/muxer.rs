//! The vsock muxer: one epoll set over the listening socket, host connections still
//! sending their `CONNECT` line, and established connections; the queue of connections
//! with packets for the guest; and the routing of guest packets to connections.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::unix_path::SocketPath;

use super::super::{
    op, Packet, VsockBackend, VsockChannel, VsockEpollListener, VsockError, HOST_CID, TYPE_STREAM,
};
use super::connection::{ConnState, Connection, TX_BUF_SIZE};

/// Most connections at once; beyond that, new ones are refused with RST.
const MAX_CONNECTIONS: usize = 1024;
/// Most RSTs waiting for the guest's RX buffers; beyond that (a guest that connects to
/// closed ports and never reads) further ones are dropped, and its connects time out.
const MAX_RST_QUEUE: usize = 1024;
/// Most guest data buffered for slow host sockets, all connections together (each one is
/// also held to its credit, `TX_BUF_SIZE`); a packet beyond it resets its connection.
pub const MAX_BUFFERED: usize = 32 << 20;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// First host-side port given to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A connection's identity: the host-side and the guest-side port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

#[derive(Clone, Copy, Debug)]
enum Token {
    Listener,
    Pending,
    Conn(ConnKey),
}

#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Errors creating the muxer.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("binding vsock socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock muxer epoll: {0}")]
    Epoll(#[source] std::io::Error),
}

/// The Unix-socket backend of a vsock device.
#[derive(Debug)]
pub struct VsockMuxer {
    guest_cid: u64,
    path: SocketPath,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    registered: HashMap<RawFd, (Token, EventSet)>,
    pending: HashMap<RawFd, PendingHost>,
    rxq: VecDeque<ConnKey>,
    in_rxq: HashSet<ConnKey>,
    rst_queue: VecDeque<ConnKey>,
    next_local_port: u32,
}

impl VsockMuxer {
    /// Listens on `path` for host connections; guest connections go to `<path>_<port>`.
    pub fn new(guest_cid: u64, path: &Path) -> Result<Self, MuxerError> {
        let bind_err = |source| MuxerError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let sock = SocketPath::new(path).map_err(bind_err)?;
        let listener = sock.bind().map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let mut m = VsockMuxer {
            guest_cid,
            path: sock,
            listener,
            epoll: Epoll::new().map_err(MuxerError::Epoll)?,
            conns: HashMap::new(),
            registered: HashMap::new(),
            pending: HashMap::new(),
            rxq: VecDeque::new(),
            in_rxq: HashSet::new(),
            rst_queue: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        };
        let fd = m.listener.as_raw_fd();
        m.set_interest(fd, Token::Listener, EventSet::IN);
        Ok(m)
    }

    /// The socket host programs connect to.
    pub fn path(&self) -> &Path {
        self.path.real()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// RSTs waiting for the guest's RX buffers.
    pub fn queued_rsts(&self) -> usize {
        self.rst_queue.len()
    }

    /// Bytes buffered for host sockets, over all connections (each bounded by flow
    /// control, all by [`MAX_BUFFERED`]).
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(Connection::tx_buffered).sum()
    }

    fn set_interest(&mut self, fd: RawFd, token: Token, events: EventSet) {
        let current = self.registered.get(&fd).map(|(_, e)| *e);
        let result = match (current, events.is_empty()) {
            (None, true) => return,
            (None, false) => self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(events, fd as u64),
            ),
            (Some(old), false) if old == events => return,
            (Some(_), false) => self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(events, fd as u64),
            ),
            (Some(_), true) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default()),
        };
        if let Err(e) = result {
            log::error!("vsock: epoll ctl on fd {fd}: {e}");
        }
        if events.is_empty() {
            self.registered.remove(&fd);
        } else {
            self.registered.insert(fd, (token, events));
        }
    }

    fn forget_fd(&mut self, fd: RawFd) {
        if self.registered.remove(&fd).is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// After any change to a connection: drop it when dead, else refresh its epoll
    /// interest and its place in the RX queue.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let fd = conn.stream().as_raw_fd();
        if conn.state() == ConnState::Dead {
            self.forget_fd(fd);
            self.conns.remove(&key);
            return;
        }
        let interest = conn.interest();
        let pending = conn.has_pending_rx();
        self.set_interest(fd, Token::Conn(key), interest);
        if pending && self.in_rxq.insert(key) {
            self.rxq.push_back(key);
        }
    }

    /// Queues an RST for `key`, unless [`MAX_RST_QUEUE`] are waiting already.
    fn queue_rst(&mut self, key: ConnKey) {
        if self.rst_queue.len() < MAX_RST_QUEUE {
            self.rst_queue.push_back(key);
        } else {
            log::debug!(
                "vsock: RST queue full, dropping RST for port {}",
                key.peer_port
            );
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == p) {
                return p;
            }
        }
    }

    fn accept_host_connections(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.pending.insert(
                        fd,
                        PendingHost {
                            stream,
                            line: Vec::new(),
                        },
                    );
                    self.set_interest(fd, Token::Pending, EventSet::IN);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("vsock: accept on {}: {e}", self.path.real().display());
                    return;
                }
            }
        }
    }

    /// Reads a host connection's `CONNECT <port>\n`; on a complete line, starts the
    /// connection to the guest.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break Err("closed before CONNECT"),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&p.line),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break Err("CONNECT line too long"),
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Err("read error"),
            }
        };
        self.forget_fd(fd);
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        match port {
            Ok(peer_port) if self.conns.len() < MAX_CONNECTIONS => {
                let local_port = self.alloc_local_port();
                let key = ConnKey {
                    local_port,
                    peer_port,
                };
                self.conns.insert(
                    key,
                    Connection::new_local(p.stream, self.guest_cid, local_port, peer_port),
                );
                self.refresh(key);
            }
            Ok(_) => log::warn!("vsock: too many connections, refusing a host connection"),
            Err(why) => log::debug!("vsock: dropping host connection: {why}"),
        }
    }

    /// A guest REQUEST for host port `local_port`: connect to `<path>_<port>`.
    fn connect_to_host(&mut self, key: ConnKey, pkt: &Packet<'_>) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.queue_rst(key);
            return;
        }
        let target = self.path.sibling(&format!("_{}", key.local_port));
        match connect_nonblocking(&target) {
            Ok(stream) => {
                let conn = Connection::new_peer(
                    stream,
                    self.guest_cid,
                    key.local_port,
                    key.peer_port,
                    pkt,
                );
                self.conns.insert(key, conn);
                self.refresh(key);
            }
            Err(e) => {
                log::debug!("vsock: guest connect to {}: {e}", target.display());
                self.queue_rst(key);
            }
        }
    }
}

fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let text = std::str::from_utf8(line).map_err(|_| "CONNECT line is not text")?;
    let port = text
        .trim_end_matches('\r')
        .strip_prefix("CONNECT ")
        .ok_or("expected CONNECT <port>")?;
    port.trim().parse().map_err(|_| "bad port in CONNECT")
}

/// Connects a Unix stream without ever blocking the event loop (a full backlog fails).
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

impl VsockChannel for VsockMuxer {
    fn recv_pkt(&mut self, pkt: &mut Packet<'_>) -> Result<(), VsockError> {
        if let Some(key) = self.rst_queue.pop_front() {
            pkt.set_src_cid(HOST_CID)
                .set_dst_cid(self.guest_cid)
                .set_src_port(key.local_port)
                .set_dst_port(key.peer_port)
                .set_type(TYPE_STREAM)
                .set_op(op::RST)
                .set_flags(0)
                .set_len(0)
                .set_buf_alloc(TX_BUF_SIZE)
                .set_fwd_cnt(0);
            return Ok(());
        }
        while let Some(key) = self.rxq.pop_front() {
            self.in_rxq.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let result = conn.recv_pkt(pkt);
            self.refresh(key);
            match result {
                Ok(()) => return Ok(()),
                Err(VsockError::NoData) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(VsockError::NoData)
    }

    fn send_pkt(&mut self, pkt: &Packet<'_>) {
        if pkt.dst_cid() != HOST_CID || pkt.src_cid() != self.guest_cid {
            log::debug!(
                "vsock: dropping packet {} -> {}",
                pkt.src_cid(),
                pkt.dst_cid()
            );
            return;
        }
        let key = ConnKey {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
        };
        if pkt.type_() != TYPE_STREAM {
            if pkt.op() != op::RST {
                self.queue_rst(key);
            }
            return;
        }
        match (self.conns.get_mut(&key), pkt.op()) {
            (None, op::REQUEST) => self.connect_to_host(key, pkt),
            (None, op::RST) => {}
            (None, _) => self.queue_rst(key),
            (Some(conn), op::RST) => {
                conn.kill();
                self.refresh(key);
            }
            (Some(_), op) => {
                let over =
                    op == op::RW && self.buffered_bytes() + pkt.len() as usize > MAX_BUFFERED;
                if let Some(conn) = self.conns.get_mut(&key) {
                    if over {
                        log::warn!(
                            "vsock: {MAX_BUFFERED} bytes buffered for host sockets: reset port {}",
                            key.local_port
                        );
                        conn.reset();
                    } else {
                        conn.send_pkt(pkt);
                    }
                }
                self.refresh(key);
            }
        }
    }

    fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rxq.is_empty()
    }
}

impl VsockEpollListener for VsockMuxer {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn interest(&self) -> EventSet {
        EventSet::IN
    }

    fn notify(&mut self, _events: EventSet) {
        let mut ready = vec![EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut ready) {
            Ok(n) => n,
            Err(e) => {
                log::error!("vsock: epoll wait: {e}");
                return;
            }
        };
        for ev in &ready[..n] {
            let fd = ev.data() as RawFd;
            let events = ev.event_set();
            match self.registered.get(&fd).map(|(t, _)| *t) {
                Some(Token::Listener) => self.accept_host_connections(),
                Some(Token::Pending) => self.read_connect_line(fd),
                Some(Token::Conn(key)) => {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.notify(events);
                    }
                    self.refresh(key);
                }
                None => {}
            }
        }
    }
}

impl VsockBackend for VsockMuxer {}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        // The socket file is ours: leave nothing behind.
        let _ = std::fs::remove_file(self.path.real());
    }
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Ok(52));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"connect 5").is_err());
        assert!(parse_connect(b"CONNECT 99999999999").is_err());
        assert!(parse_connect(&[0xff, 0xfe]).is_err());
    }
}
