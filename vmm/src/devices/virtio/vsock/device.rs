//! The virtio-vsock device model: three queues (RX, TX, event), the guest CID in config
//! space, and the loop that moves packets between the queues and the backend. It runs on
//! the event loop thread: queue kicks and backend readiness both arrive there.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vmm_sys_util::epoll::EventSet;

use super::{VsockBackend, VsockError, MAX_PKT_DATA, VSOCK_DEVICE_ID};
use crate::devices::virtio::activation::{Activation, DeviceEvent, TOKEN_DEVICE_BASE};
use crate::devices::virtio::{ActivateError, VirtioDevice, VirtioInterrupt, VirtioQueue};
use crate::memory::GuestMemory;

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 16];

/// Event-loop token of the backend's descriptor.
const TOKEN_BACKEND: u32 = TOKEN_DEVICE_BASE;

/// A vsock device with backend `B`.
pub struct Vsock<B: VsockBackend> {
    cid: u64,
    backend: B,
    activation: Activation,
}

impl<B: VsockBackend> std::fmt::Debug for Vsock<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("active", &self.activation.is_active())
            .finish()
    }
}

impl<B: VsockBackend> Vsock<B> {
    /// A device giving the guest context id `cid`.
    pub fn new(cid: u64, backend: B) -> std::io::Result<Self> {
        Ok(Vsock {
            cid,
            backend,
            activation: Activation::new("vsock")?,
        })
    }

    /// The backend (for tests and diagnostics).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Moves guest packets from the TX queue to the backend. Returns whether any moved.
    pub fn process_tx(&mut self) -> bool {
        let Some(a) = self.activation.active() else {
            return false;
        };
        let backend = &mut self.backend;
        a.consume(TXQ, |mut chain, mem| {
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => backend.send_pkt(&pkt),
                Err(e) => log::warn!("vsock: dropping malformed TX packet: {e:?}"),
            }
            0
        })
    }

    /// Fills guest RX buffers with what the backend has. Returns whether any was filled.
    pub fn process_rx(&mut self) -> bool {
        let Some(a) = self.activation.active() else {
            return false;
        };
        let q = &mut a.queues[RXQ].queue;
        let mut used = false;
        while self.backend.has_pending_rx() {
            let Some(mut chain) = q.pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(&a.mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.backend.recv_pkt(&mut pkt) {
                    Ok(()) => PKT_HEADER_SIZE as u32 + pkt.len(),
                    Err(VsockError::NoData) => {
                        q.go_to_previous_position();
                        break;
                    }
                    Err(e) => {
                        log::warn!("vsock: RX buffer refused: {e}");
                        0
                    }
                },
                Err(e) => {
                    log::warn!("vsock: unusable RX buffer: {e:?}");
                    0
                }
            };
            if let Err(e) = q.add_used(&a.mem, head, len) {
                log::error!("vsock: RX add_used: {e:?}");
            }
            used = true;
        }
        if used {
            a.signal_used(RXQ);
        }
        used
    }

    /// The backend's descriptor is ready: let it work, then move packets both ways.
    pub fn handle_backend_event(&mut self, events: EventSet) {
        self.backend.notify(events);
        self.process_tx();
        self.process_rx();
    }
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.cid.to_le_bytes();
        crate::devices::virtio::read_config_window(&cfg, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<VirtioQueue>,
    ) -> Result<(), ActivateError> {
        self.activation
            .activate(mem, interrupt, queues, QUEUE_SIZES.len())
    }
}

impl<B: VsockBackend> MutEventSubscriber for Vsock<B> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.activation.handle(&events, ops) {
            // Host connections may have queued packets before the driver was up.
            DeviceEvent::Activated | DeviceEvent::Queue(RXQ) => {
                self.process_rx();
            }
            DeviceEvent::Queue(TXQ) => {
                // Answers to TX packets (RESPONSE, RST, credit) go out right away.
                self.process_tx();
                self.process_rx();
            }
            DeviceEvent::Queue(EVQ) => {}
            DeviceEvent::Device(TOKEN_BACKEND) => self.handle_backend_event(events.event_set()),
            other => log::warn!("vsock: unexpected event {other:?}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        let backend = Events::with_data_raw(
            self.backend.as_raw_fd(),
            TOKEN_BACKEND,
            self.backend.interest(),
        );
        if let Err(e) = ops.add(backend) {
            log::error!("vsock: registering backend fd: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests;

impl<B: VsockBackend> AsRawFd for Vsock<B> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.backend.as_raw_fd()
    }
}
