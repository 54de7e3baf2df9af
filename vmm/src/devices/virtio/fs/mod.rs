//! virtio-fs in the VMM process: the device model (`device`) moves FUSE requests between
//! the guest's queues and a FUSE server; the backend (`passthrough`) is fuse-backend-rs's
//! passthrough file system over one host directory, configured so that the guest can
//! reach nothing outside it.

pub mod device;
pub mod passthrough;

pub use device::VirtioFs;

/// virtio device id of a file system device.
pub const FS_DEVICE_ID: u32 = 26;
/// Longest tag the config space holds.
pub const TAG_LEN: usize = 36;
