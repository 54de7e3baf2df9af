//! virtio-vsock in user space (no vhost): the virtio device model (`device`) moves packets
//! between the guest's queues and a backend; the backend (`unix`, a muxer of host Unix
//! sockets) owns connections, flow control and host file descriptors.
//!
//! The split follows the traits below: the device only knows `VsockChannel` (packets in and
//! out) and `VsockEpollListener` (one file descriptor the event loop watches for it).

pub mod device;
pub mod unix;

use std::os::fd::RawFd;

use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::epoll::EventSet;

pub use device::Vsock;

/// virtio device id of vsock.
pub const VSOCK_DEVICE_ID: u32 = 19;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// The only socket type runvm supports.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload runvm puts in, or accepts from, one packet.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// Packet operations (virtio 1.2, 5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet whose header and payload live in guest memory.
pub type Packet<'a> = VsockPacket<'a, ()>;

/// Errors between the device and its backend.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VsockError {
    /// The backend has nothing for the guest right now.
    #[error("no packet pending for the guest")]
    NoData,
    /// The guest gave an RX buffer without room for a payload.
    #[error("RX buffer without a data area")]
    NoDataBuffer,
}

/// Moves packets between the guest and a backend.
pub trait VsockChannel {
    /// Fills `pkt`, an RX buffer from the guest, with the next packet for the guest.
    fn recv_pkt(&mut self, pkt: &mut Packet<'_>) -> Result<(), VsockError>;
    /// Handles a packet the guest sent. The backend always consumes it: flow control
    /// guarantees room for data, and a guest that overruns its credit loses the connection.
    fn send_pkt(&mut self, pkt: &Packet<'_>);
    /// Whether `recv_pkt` may have something.
    fn has_pending_rx(&self) -> bool;
}

/// A backend that the event loop wakes through one file descriptor.
pub trait VsockEpollListener {
    /// The descriptor to watch.
    fn as_raw_fd(&self) -> RawFd;
    /// The events to watch it for.
    fn interest(&self) -> EventSet;
    /// Handles `events` on the descriptor.
    fn notify(&mut self, events: EventSet);
}

/// What the vsock device needs from a backend.
pub trait VsockBackend: VsockChannel + VsockEpollListener + Send {}
