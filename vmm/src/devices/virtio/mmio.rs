//! The virtio-mmio transport (virtio 1.2 section 4.2, register layout version 2): the
//! registers a driver uses to negotiate features, configure queues and drive the device
//! status, and the hand-over of live queues to the device model at DRIVER_OK.
//!
//! Queue notifications normally bypass this code: the VM registers one ioeventfd per queue
//! on the QueueNotify register (`queue_notify_eventfds`). A notify write that does reach
//! the transport is forwarded to the same eventfd.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    VirtioDevice, VirtioInterrupt, VirtioQueue, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::{lock, BusDevice};
use crate::memory::GuestMemory;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    active: bool,
    broken: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("queue of maximum size {0} is not a power of two up to 32768")]
    BadQueueSize(u16),
    #[error("creating a queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("restoring virtio device type {device_type}: {reason}")]
    Restore { device_type: u32, reason: String },
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is the device's interrupt line.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, MmioError> {
        let sizes = lock(&device).queue_max_sizes().to_vec();
        let queues = sizes
            .iter()
            .map(|&s| Queue::new(s).map_err(|_| MmioError::BadQueueSize(s)))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            active: false,
            broken: false,
        })
    }

    /// The eventfds that receive each queue's notifications, in queue order, for ioeventfd
    /// registration at QueueNotify with the queue index as datamatch.
    pub fn queue_notify_eventfds(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device model has been activated.
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn device_features(&self) -> u64 {
        lock(&self.device).features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue registers take effect only while the driver configures the device.
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u32) -> u32 {
        let sel = self.queue_sel as usize;
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.queues.get(sel).map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.queues.get(sel).map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if negotiating => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.with_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.with_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.with_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.write_status(v),
            _ => log::debug!("virtio-mmio: ignored write {v:#x} to register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits; anything else is a driver bug we refuse.
        if v & self.status != self.status {
            log::warn!(
                "virtio-mmio: status {:#x} -> {v:#x} clears bits",
                self.status
            );
            return;
        }
        let added = v & !self.status;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                log::warn!(
                    "virtio-mmio: driver features {:#x} are not a modern subset of {offered:#x}",
                    self.driver_features
                );
                self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
            lock(&self.device).ack_features(self.driver_features);
        }
        self.status = v;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 || self.broken {
            self.fail("DRIVER_OK without FEATURES_OK or after a failed reset");
            return;
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut live = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(&self.mem) {
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                log::error!("virtio-mmio: queue {index} is not valid");
                return;
            }
            let notify = match self.queue_evts[index].try_clone() {
                Ok(e) => e,
                Err(e) => return self.fail(&format!("cloning queue eventfd: {e}")),
            };
            // The device gets its own copy of the queue; the transport keeps the registers.
            let queue = match Queue::try_from(q.state()) {
                Ok(queue) => queue,
                Err(e) => return self.fail(&format!("queue {index}: {e:?}")),
            };
            live.push(VirtioQueue { queue, notify });
        }
        let result = lock(&self.device).activate(self.mem.clone(), self.interrupt.clone(), live);
        match result {
            Ok(()) => self.active = true,
            Err(e) => self.fail(&e.to_string()),
        }
    }

    fn fail(&mut self, why: &str) {
        log::error!(
            "virtio-mmio: device type {} failed: {why}",
            lock(&self.device).device_type()
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        if self.active && !lock(&self.device).reset() {
            self.broken = true;
        }
        self.active = false;
        self.status = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.interrupt.ack(u32::MAX);
        for q in &mut self.queues {
            q.reset();
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            lock(&self.device).read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::debug!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset as u32).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            lock(&self.device).write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("virtio-mmio: {}-byte write at {offset:#x}", data.len());
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_reg(offset as u32, u32::from_le_bytes(bytes));
        }
    }
}

mod persist;
pub use persist::MmioState;

#[cfg(test)]
mod tests;
