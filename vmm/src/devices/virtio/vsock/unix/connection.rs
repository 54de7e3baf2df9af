//! One vsock stream connection between a guest port and a host Unix stream: the connection
//! states, the credit-based flow control of the virtio spec (5.10.6.3), and the byte moves
//! in both directions.
//!
//! Flow control bounds memory both ways. Guest -> host: the guest may have at most
//! `TX_BUF_SIZE` bytes unconfirmed, so `tx_buf` (data the host socket did not take yet)
//! never exceeds it; `fwd_cnt` counts bytes handed to the host socket and reaches the guest
//! in every packet header and in CREDIT_UPDATEs. Host -> guest: the host socket is read
//! only while the guest advertises free space (`peer_free`); otherwise the host writer
//! blocks on its own socket buffer.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vm_memory::volatile_memory::Error as VolatileError;
use vm_memory::{ReadVolatile, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::super::{op, Packet, VsockError, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer runvm advertises for each connection (guest -> host direction).
pub const TX_BUF_SIZE: u32 = 1024 * 1024;

/// How the connection came about and where it stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST to send or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated: the host socket is connected, RESPONSE to send.
    PeerInit,
    /// Data flows.
    Established,
    /// An RST is due; the connection ends once it is sent.
    Resetting,
    /// Finished: the muxer removes it.
    Dead,
}

/// A vsock connection backed by a host Unix stream.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    state: ConnState,
    request_pending: bool,
    /// Bytes written to the host before any guest data ("OK <port>\n").
    preamble: Vec<u8>,
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes received from the guest.
    guest_tx_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_update_pending: bool,
    credit_request_pending: bool,
    credit_requested: bool,
    /// The host socket has (or may have) data: epoll said so and no read hit WouldBlock.
    readable: bool,
    host_eof: bool,
    shutdown_sent: bool,
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    write_shut: bool,
}

impl Connection {
    fn new(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        state: ConnState,
    ) -> Self {
        Connection {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state,
            request_pending: false,
            preamble: Vec::new(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            guest_tx_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_update_pending: false,
            credit_request_pending: false,
            credit_requested: false,
            readable: false,
            host_eof: false,
            shutdown_sent: false,
            peer_shut_send: false,
            peer_shut_rcv: false,
            write_shut: false,
        }
    }

    /// A host-initiated connection: a REQUEST for `peer_port` is due.
    pub fn new_local(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            ConnState::LocalInit,
        );
        c.request_pending = true;
        c
    }

    /// A guest-initiated connection whose host side is connected: a RESPONSE is due.
    pub fn new_peer(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        pkt: &Packet<'_>,
    ) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            ConnState::PeerInit,
        );
        c.peer_buf_alloc = pkt.buf_alloc();
        c.peer_fwd_cnt = Wrapping(pkt.fwd_cnt());
        c
    }

    /// The host stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Where the connection stands.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// Bytes from the guest waiting for the host socket.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.peer_free() > 0
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_pending_rx(&self) -> bool {
        match self.state {
            ConnState::Dead => false,
            ConnState::Resetting => true,
            ConnState::LocalInit => self.request_pending,
            ConnState::PeerInit => true,
            ConnState::Established => {
                self.credit_request_pending
                    || self.credit_update_pending
                    || (self.readable && self.can_send_data())
                    || (self.host_eof && !self.shutdown_sent)
            }
        }
    }

    /// The events to watch the host stream for.
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if matches!(self.state, ConnState::Dead | ConnState::Resetting) {
            return ev;
        }
        if !self.readable && self.can_send_data() {
            ev |= EventSet::IN;
        }
        if !self.preamble.is_empty() || !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    fn fill_header(&mut self, pkt: &mut Packet<'_>, op: u16) {
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(self.local_port)
            .set_dst_port(self.peer_port)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(0)
            .set_len(0)
            .set_buf_alloc(TX_BUF_SIZE)
            .set_fwd_cnt(self.fwd_cnt.0);
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_pending = false;
    }

    /// Writes the connection's next packet for the guest into `pkt`.
    pub fn recv_pkt(&mut self, pkt: &mut Packet<'_>) -> Result<(), VsockError> {
        match self.state {
            ConnState::Dead => return Err(VsockError::NoData),
            ConnState::Resetting => {
                self.fill_header(pkt, op::RST);
                self.state = ConnState::Dead;
                return Ok(());
            }
            ConnState::LocalInit if self.request_pending => {
                self.fill_header(pkt, op::REQUEST);
                self.request_pending = false;
                return Ok(());
            }
            ConnState::LocalInit => return Err(VsockError::NoData),
            ConnState::PeerInit => {
                self.fill_header(pkt, op::RESPONSE);
                self.state = ConnState::Established;
                return Ok(());
            }
            ConnState::Established => {}
        }
        if self.credit_request_pending {
            self.credit_request_pending = false;
            self.fill_header(pkt, op::CREDIT_REQUEST);
            return Ok(());
        }
        if self.readable && self.can_send_data() {
            match self.read_into(pkt)? {
                ReadOutcome::Data => return Ok(()),
                ReadOutcome::Eof | ReadOutcome::WouldBlock => {}
                ReadOutcome::Failed => {
                    self.fill_header(pkt, op::RST);
                    self.state = ConnState::Dead;
                    return Ok(());
                }
            }
        } else if self.readable && self.peer_free() == 0 && !self.credit_requested {
            // Data waits on the host side but the guest has no room: ask for an update.
            self.credit_requested = true;
            self.fill_header(pkt, op::CREDIT_REQUEST);
            return Ok(());
        }
        if self.host_eof && !self.shutdown_sent {
            self.fill_header(pkt, op::SHUTDOWN);
            pkt.set_flags(SHUTDOWN_SEND);
            self.shutdown_sent = true;
            self.check_finished();
            return Ok(());
        }
        if self.credit_update_pending {
            self.fill_header(pkt, op::CREDIT_UPDATE);
            return Ok(());
        }
        Err(VsockError::NoData)
    }

    fn read_into(&mut self, pkt: &mut Packet<'_>) -> Result<ReadOutcome, VsockError> {
        let Some(data) = pkt.data_slice() else {
            return Err(VsockError::NoDataBuffer);
        };
        let max = (data.len() as u32).min(self.peer_free()) as usize;
        let mut window = data
            .subslice(0, max)
            .map_err(|_| VsockError::NoDataBuffer)?;
        match self.stream.read_volatile(&mut window) {
            Ok(0) => {
                self.readable = false;
                self.host_eof = true;
                Ok(ReadOutcome::Eof)
            }
            Ok(n) => {
                self.fill_header(pkt, op::RW);
                pkt.set_len(n as u32);
                self.rx_cnt += Wrapping(n as u32);
                Ok(ReadOutcome::Data)
            }
            Err(VolatileError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {
                self.readable = false;
                Ok(ReadOutcome::WouldBlock)
            }
            Err(VolatileError::IOError(e)) if e.kind() == ErrorKind::Interrupted => {
                Ok(ReadOutcome::WouldBlock)
            }
            Err(e) => {
                log::debug!(
                    "vsock: reading host stream of port {}: {e}",
                    self.local_port
                );
                Ok(ReadOutcome::Failed)
            }
        }
    }

    /// Handles a packet from the guest for this connection (not RST: the muxer handles it).
    pub fn send_pkt(&mut self, pkt: &Packet<'_>) {
        self.peer_buf_alloc = pkt.buf_alloc();
        self.peer_fwd_cnt = Wrapping(pkt.fwd_cnt());
        if self.peer_free() > 0 {
            self.credit_requested = false;
        }
        match (pkt.op(), self.state) {
            (op::RESPONSE, ConnState::LocalInit) => {
                self.state = ConnState::Established;
                self.preamble = format!("OK {}\n", self.local_port).into_bytes();
                self.flush();
            }
            (op::RW, ConnState::Established) if !self.peer_shut_send => self.take_data(pkt),
            (op::CREDIT_UPDATE, ConnState::Established) => {}
            (op::CREDIT_REQUEST, ConnState::Established) => self.credit_update_pending = true,
            (op::SHUTDOWN, ConnState::Established) => {
                self.peer_shut_rcv |= pkt.flags() & SHUTDOWN_RCV != 0;
                self.peer_shut_send |= pkt.flags() & SHUTDOWN_SEND != 0;
                self.flush();
            }
            (op, state) => {
                log::debug!(
                    "vsock: op {op} in state {state:?} on port {}: reset",
                    self.local_port
                );
                self.state = ConnState::Resetting;
            }
        }
        self.check_finished();
    }

    fn take_data(&mut self, pkt: &Packet<'_>) {
        let len = pkt.len() as usize;
        if len == 0 {
            return;
        }
        let Some(data) = pkt.data_slice() else {
            self.state = ConnState::Resetting;
            return;
        };
        if self.tx_buf.len() + len > TX_BUF_SIZE as usize {
            log::warn!(
                "vsock: guest overran its credit on port {}: reset",
                self.local_port
            );
            self.state = ConnState::Resetting;
            return;
        }
        let Ok(data) = data.subslice(0, len) else {
            self.state = ConnState::Resetting;
            return;
        };
        self.guest_tx_cnt += Wrapping(len as u32);
        let mut written = 0;
        if self.preamble.is_empty() && self.tx_buf.is_empty() {
            match self.stream.write_volatile(&data) {
                Ok(n) => written = n,
                Err(VolatileError::IOError(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => {
                    log::debug!(
                        "vsock: writing host stream of port {}: {e}",
                        self.local_port
                    );
                    self.state = ConnState::Resetting;
                    return;
                }
            }
            self.forwarded(written);
        }
        if written < len {
            let mut rest = vec![0u8; len - written];
            if let Ok(tail) = data.offset(written) {
                tail.copy_to(&mut rest[..]);
            }
            self.tx_buf.extend(rest);
        }
    }

    /// Counts `n` bytes handed to the host socket, and decides whether the guest should
    /// hear about it now. Every update costs the guest an interrupt, so one is sent only
    /// when the space the guest believes it has falls below half of its send window.
    /// That window is our buffer, capped by recent Linux guests at their own buf_alloc
    /// (which they advertise in every header).
    fn forwarded(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(n as u32);
        let window = TX_BUF_SIZE.min(self.peer_buf_alloc.max(1));
        let guest_view_free = window.saturating_sub((self.guest_tx_cnt - self.last_fwd_cnt_sent).0);
        if n > 0 && guest_view_free < window / 2 {
            self.credit_update_pending = true;
        }
    }

    /// Writes buffered guest data to the host stream as far as it takes it.
    fn flush(&mut self) {
        while !self.preamble.is_empty() {
            match self.stream.write(&self.preamble) {
                Ok(n) => {
                    self.preamble.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.state = ConnState::Resetting;
                    return;
                }
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.forwarded(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::debug!(
                        "vsock: writing host stream of port {}: {e}",
                        self.local_port
                    );
                    self.state = ConnState::Resetting;
                    return;
                }
            }
        }
        if self.peer_shut_send && !self.write_shut {
            // The guest sends no more: the host reader sees end of stream.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.write_shut = true;
        }
    }

    /// Handles readiness of the host stream.
    pub fn notify(&mut self, events: EventSet) {
        if events
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
        {
            self.readable = true;
        }
        if events.intersects(EventSet::OUT | EventSet::ERROR) {
            self.flush();
        }
        self.check_finished();
    }

    /// Both directions are done: the guest will neither send nor receive more, or the host
    /// has ended its side and the guest its own. Then an RST ends it on both sides.
    fn check_finished(&mut self) {
        if self.state != ConnState::Established {
            return;
        }
        let guest_done_sending =
            self.peer_shut_send && self.tx_buf.is_empty() && self.preamble.is_empty();
        let host_done_sending = (self.host_eof && self.shutdown_sent) || self.peer_shut_rcv;
        if guest_done_sending && host_done_sending {
            self.state = ConnState::Resetting;
        }
    }

    /// Resets the connection: the guest gets an RST, then it is gone.
    pub fn reset(&mut self) {
        self.state = ConnState::Resetting;
    }

    /// Ends the connection at once (the guest sent RST, or the VM goes away).
    pub fn kill(&mut self) {
        self.state = ConnState::Dead;
    }
}

enum ReadOutcome {
    Data,
    Eof,
    WouldBlock,
    Failed,
}
