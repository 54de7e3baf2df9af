//! A virtio-mmio transport in a snapshot: its registers, its queues' registers, and the
//! queues its device model serves (with their ring positions). Restoring hands the
//! device its queues again without the driver's help, lets the device tell the guest
//! what it must know about the move (`VirtioDevice::restored`), and kicks every queue
//! once, so buffers the guest made available just before the snapshot are not lost.

use serde::{Deserialize, Serialize};

use super::{MmioError, MmioTransport};
use crate::bus::lock;
use crate::devices::virtio::{QueueSnapshot, VirtioDevice, VirtioQueue};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;

/// A transport's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_type: u32,
    pub status: u32,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub active: bool,
    pub broken: bool,
    /// The queue registers the driver wrote.
    pub queues: Vec<QueueSnapshot>,
    /// The queues the active device serves.
    pub live: Option<Vec<QueueSnapshot>>,
}

impl MmioTransport {
    /// The device model behind the transport.
    pub fn device(&self) -> std::sync::Arc<std::sync::Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// The transport's state; `device` is its device model, which the caller holds
    /// locked so that nothing moves its queues meanwhile.
    pub fn save_state(&self, device: &dyn VirtioDevice) -> MmioState {
        MmioState {
            device_type: device.device_type(),
            status: self.status,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            active: self.active,
            broken: self.broken,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            live: if self.active {
                device.queue_states()
            } else {
                None
            },
        }
    }

    /// Puts a new transport and its device into the saved state `s` (before the VM runs).
    pub fn restore_state(&mut self, s: &MmioState) -> Result<(), MmioError> {
        let device = self.device.clone();
        let mut dev = lock(&device);
        let device_type = dev.device_type();
        let fail = |reason: String| MmioError::Restore {
            device_type,
            reason,
        };
        if s.device_type != device_type {
            return Err(fail(format!("saved for device type {}", s.device_type)));
        }
        let queues = restore_queues(&s.queues, dev.queue_max_sizes()).map_err(&fail)?;
        self.queues = queues;
        self.status = s.status;
        self.queue_sel = s.queue_sel;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.config_generation = s.config_generation;
        self.broken = s.broken;
        self.interrupt.set_status(s.interrupt_status);
        // An interrupt raised while the snapshot was taken may sit in interrupt
        // controller state saved before it: raise it again (the driver reads the status
        // register, so a spurious one is harmless).
        if s.interrupt_status != 0 {
            self.interrupt
                .line()
                .raise()
                .map_err(|e| fail(format!("raising its interrupt: {e}")))?;
        }
        if s.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            dev.ack_features(s.driver_features);
        }
        if !s.active {
            return Ok(());
        }
        let live = s
            .live
            .as_deref()
            .ok_or_else(|| fail("an active device without its queues".into()))?;
        let live = restore_queues(live, dev.queue_max_sizes()).map_err(&fail)?;
        let mut handed = Vec::with_capacity(live.len());
        for (queue, evt) in live.into_iter().zip(&self.queue_evts) {
            let notify = evt
                .try_clone()
                .map_err(|e| fail(format!("queue eventfd: {e}")))?;
            handed.push(VirtioQueue { queue, notify });
        }
        dev.activate(self.mem.clone(), self.interrupt.clone(), handed)
            .map_err(|e| fail(e.to_string()))?;
        self.active = true;
        dev.restored();
        for evt in &self.queue_evts {
            let _ = evt.write(1);
        }
        Ok(())
    }
}

/// Queues from their saved states; each must fit the device's maximum size.
fn restore_queues(
    saved: &[QueueSnapshot],
    max_sizes: &[u16],
) -> Result<Vec<virtio_queue::Queue>, String> {
    if saved.len() != max_sizes.len() {
        return Err(format!(
            "{} queues saved, the device has {}",
            saved.len(),
            max_sizes.len()
        ));
    }
    saved
        .iter()
        .zip(max_sizes)
        .enumerate()
        .map(|(i, (q, &max))| {
            if q.max_size != max {
                return Err(format!("queue {i}: saved with maximum size {}", q.max_size));
            }
            q.to_queue().map_err(|e| format!("queue {i}: {e}"))
        })
        .collect()
}
