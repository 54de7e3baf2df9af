//! The virtio-vsock device model: three queues (RX, TX, event), the guest CID in config
//! space, and the loop that moves packets between the queues and the backend. It runs on
//! the event loop thread: queue kicks and backend readiness both arrive there.
//!
//! After a restore the device sends the guest a transport-reset event (virtio 1.2,
//! 5.10.6.6): the guest drops every connection it had (their host ends are gone with the
//! old VMM) and reads its CID again. Until the guest has handled the event, which it
//! shows by giving the event buffer back (a kick on the event queue), nothing goes to its
//! RX queue, so no new connection is caught by the reset.

use std::io::Write;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vmm_sys_util::epoll::EventSet;

use super::{VsockBackend, VsockError, MAX_PKT_DATA, VSOCK_DEVICE_ID};
use crate::devices::virtio::activation::{Activation, DeviceEvent, TOKEN_DEVICE_BASE};
use crate::devices::virtio::{
    ActivateError, QueueSnapshot, VirtioDevice, VirtioInterrupt, VirtioQueue,
};
use crate::memory::GuestMemory;

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 16];
/// `virtio_vsock_event.id` of a transport reset.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Event-loop token of the backend's descriptor.
const TOKEN_BACKEND: u32 = TOKEN_DEVICE_BASE;

/// A vsock device with backend `B`.
pub struct Vsock<B: VsockBackend> {
    cid: u64,
    backend: B,
    activation: Activation,
    /// A transport reset was sent and the guest has not handled it yet: the event
    /// queue's available index when it was sent (the guest raises it when it gives the
    /// buffer back).
    reset_pending: Option<Wrapping<u16>>,
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
            reset_pending: None,
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

    /// Whether a transport reset waits for the guest.
    pub fn reset_pending(&self) -> bool {
        self.reset_pending.is_some()
    }

    /// Sends the guest a transport-reset event; RX waits until the guest handled it.
    fn send_transport_reset(&mut self) {
        let Some(a) = self.activation.active() else {
            return;
        };
        let mut sent = false;
        let avail = a.queues[EVQ]
            .queue
            .avail_idx(&a.mem, Ordering::Acquire)
            .ok();
        a.consume_one(EVQ, |chain, mem| {
            let written = chain
                .writer(mem)
                .ok()
                .and_then(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).ok());
            sent = written.is_some();
            if sent {
                4
            } else {
                0
            }
        });
        if sent {
            self.reset_pending = avail;
        } else {
            log::warn!("vsock: no event buffer for the transport reset");
        }
    }

    /// Once the guest gave the event buffer back, the reset is behind it: RX resumes.
    fn check_reset_done(&mut self) {
        let Some(sent_at) = self.reset_pending else {
            return;
        };
        let Some(a) = self.activation.active() else {
            return;
        };
        let now = a.queues[EVQ].queue.avail_idx(&a.mem, Ordering::Acquire);
        if now.is_ok_and(|idx| idx != sent_at) {
            self.reset_pending = None;
            self.process_rx();
        }
    }

    /// Fills guest RX buffers with what the backend has. Returns whether any was filled.
    pub fn process_rx(&mut self) -> bool {
        if self.reset_pending.is_some() {
            return false;
        }
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

    fn queue_states(&self) -> Option<Vec<QueueSnapshot>> {
        self.activation.queue_states()
    }

    fn restored(&mut self) {
        self.send_transport_reset();
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
            DeviceEvent::Queue(EVQ) => self.check_reset_done(),
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
