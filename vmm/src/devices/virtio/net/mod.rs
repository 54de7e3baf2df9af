//! virtio-net in user space (no vhost): the device model (`device`) moves Ethernet frames,
//! each behind a 12-byte virtio-net header, between the guest's RX/TX queues and a
//! backend; the backend (`tap`: a Linux tap opened with `IFF_VNET_HDR`) is the host side.
//!
//! A VM has its network device from boot, with no backend and its link down: the
//! container's network is known only at `start`, when a backend is attached through a
//! [`NetAttach`] handle from any thread. The device knows its backend only through
//! [`NetBackend`].

pub mod device;
pub mod tap;

use std::os::fd::AsRawFd;

pub use device::{Net, NetAttach};

/// virtio device id of a network card.
pub const NET_DEVICE_ID: u32 = 1;
/// The header before every frame: `virtio_net_hdr_v1` (with VERSION_1 it always carries
/// `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame with its header the device moves: a 64 KiB GSO packet with Ethernet and
/// VLAN headers (what Linux's virtio-net driver sends at most).
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65562;

/// Feature bits (virtio 1.2, 5.1.3).
pub mod features {
    use virtio_bindings::virtio_net as n;
    pub const CSUM: u64 = 1 << n::VIRTIO_NET_F_CSUM;
    pub const GUEST_CSUM: u64 = 1 << n::VIRTIO_NET_F_GUEST_CSUM;
    pub const MAC: u64 = 1 << n::VIRTIO_NET_F_MAC;
    pub const GUEST_TSO4: u64 = 1 << n::VIRTIO_NET_F_GUEST_TSO4;
    pub const GUEST_TSO6: u64 = 1 << n::VIRTIO_NET_F_GUEST_TSO6;
    pub const GUEST_UFO: u64 = 1 << n::VIRTIO_NET_F_GUEST_UFO;
    pub const HOST_TSO4: u64 = 1 << n::VIRTIO_NET_F_HOST_TSO4;
    pub const HOST_TSO6: u64 = 1 << n::VIRTIO_NET_F_HOST_TSO6;
    pub const HOST_UFO: u64 = 1 << n::VIRTIO_NET_F_HOST_UFO;
    pub const MRG_RXBUF: u64 = 1 << n::VIRTIO_NET_F_MRG_RXBUF;
    pub const STATUS: u64 = 1 << n::VIRTIO_NET_F_STATUS;
    /// What runvm's device offers: checksum and segmentation offloads both ways,
    /// mergeable RX buffers, a MAC and a link status.
    pub const OFFERED: u64 = CSUM
        | GUEST_CSUM
        | GUEST_TSO4
        | GUEST_TSO6
        | GUEST_UFO
        | HOST_TSO4
        | HOST_TSO6
        | HOST_UFO
        | MRG_RXBUF
        | MAC
        | STATUS;
}

/// The host side of a network device: frames with their virtio-net header in front.
pub trait NetBackend: Send + AsRawFd + std::fmt::Debug {
    /// Reads one frame (header included) into `buf`, which holds [`MAX_FRAME_LEN`] bytes;
    /// `Ok(None)` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;
    /// Sends one frame (header included).
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Sets which offloads frames for the guest may use: `guest_features` are the
    /// features the driver accepted.
    fn set_offloads(&mut self, guest_features: u64) -> std::io::Result<()>;
}

/// Errors attaching a backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the VM's network device already has a backend")]
    AlreadyAttached,
    #[error("waking the device thread: {0}")]
    Wake(#[source] std::io::Error),
}
