//! The contract between a virtio device model and its transport: what a device offers
//! (type, queues, features, config space), how it is activated with live queues, and how it
//! interrupts the guest. Device models live in submodules; their host-side backends live
//! apart from them.

pub mod activation;
pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub mod test_rings;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::IrqLine;
use crate::memory::GuestMemory;

/// Feature bit every runvm device offers: a modern (1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit for used/avail event suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// A queue handed to a device at activation, with the eventfd the guest kicks.
#[derive(Debug)]
pub struct VirtioQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// A queue's registers and ring positions, as a snapshot keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub event_idx: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

impl QueueSnapshot {
    /// The state of `q`.
    pub fn of(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            event_idx: s.event_idx_enabled,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
        }
    }

    /// A queue in this state; one that virtio-queue finds inconsistent is refused.
    pub fn to_queue(&self) -> Result<Queue, String> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("{e:?}"))
    }
}

/// Copies the window `offset..offset + data.len()` of a device's config space `cfg` into
/// `data`; bytes past its end read as zero.
pub fn read_config_window(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| cfg.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// The first step of every activation: the driver enabled exactly the queues the device
/// has.
pub fn check_queue_count(queues: &[VirtioQueue], need: usize) -> Result<(), ActivateError> {
    if queues.len() == need {
        Ok(())
    } else {
        Err(ActivateError::QueueCount {
            got: queues.len(),
            need,
        })
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {index} is not valid (size or ring addresses out of guest memory)")]
    BadQueue { index: usize },
    #[error("the driver enabled {got} queues, the device needs {need}")]
    QueueCount { got: usize, need: usize },
    #[error("device backend: {0}")]
    Backend(String),
}

/// A virtio device model, independent of the transport that exposes it.
pub trait VirtioDevice: Send {
    /// The virtio device id (3 = console, 19 = vsock, 26 = fs, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// The driver's accepted features (a subset of [`VirtioDevice::features`]).
    fn ack_features(&mut self, _features: u64) {}
    /// Reads the device-specific config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space at `offset`.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues. Called once the driver sets DRIVER_OK.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<VirtioQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops an active device on a driver reset. Returns false if the device cannot be
    /// reset (it then stays broken until the VM ends).
    fn reset(&mut self) -> bool {
        false
    }
    /// The queues an active device serves, with their positions (for a snapshot).
    fn queue_states(&self) -> Option<Vec<QueueSnapshot>>;
    /// Called once a restore has activated the device with its saved queues, before the
    /// VM runs: what the device must tell the guest about having moved (vsock resets its
    /// connections).
    fn restored(&mut self) {}
}

/// The interrupt status register of a virtio-mmio device and the line it raises.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: IrqLine,
}

impl VirtioInterrupt {
    /// Bit in the status register: a used ring changed.
    pub const VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    /// Bit in the status register: the config space changed.
    pub const CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

    /// Wraps the device's interrupt line.
    pub fn new(line: IrqLine) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Tells the guest a used ring has new entries.
    pub fn signal_used_queue(&self) {
        self.signal(Self::VRING);
    }

    /// Tells the guest the config space changed.
    pub fn signal_config_change(&self) {
        self.signal(Self::CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.raise() {
            log::error!("virtio: raising irq {}: {e}", self.line.gsi());
        }
    }

    /// The pending interrupt bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets the pending bits (a restored device's).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Clears the bits the driver acknowledged.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The interrupt line (for irqfd registration).
    pub fn line(&self) -> &IrqLine {
        &self.line
    }
}
