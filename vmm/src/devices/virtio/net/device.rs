//! The virtio-net device model: RX and TX queues, the MAC and link status in config space,
//! and the loops that move frames between the queues and the backend on the event-loop
//! thread.
//!
//! RX uses mergeable buffers: one frame may fill several of the guest's buffers, counted in
//! its header's `num_buffers`. A frame that finds too few buffers waits (one frame at most)
//! until the guest posts more, and the backend is not read meanwhile, so a guest that posts
//! no RX buffers costs one frame of memory and the backend's own queue drops the rest.
//! Without a backend (before the container's network is attached) the link is down and
//! the guest's frames are dropped.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{features, NetBackend, NetError, MAX_FRAME_LEN, NET_DEVICE_ID, VNET_HDR_LEN};
use crate::bus::lock;
use crate::devices::virtio::activation::{Activation, DeviceEvent, TOKEN_DEVICE_BASE};
use crate::devices::virtio::{
    ActivateError, QueueSnapshot, VirtioDevice, VirtioInterrupt, VirtioQueue,
};
use crate::memory::GuestMemory;

const RXQ: usize = 0;
const TXQ: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Event-loop token of the attach eventfd.
const TOKEN_ATTACH: u32 = TOKEN_DEVICE_BASE;
/// Event-loop token of the backend's descriptor.
const TOKEN_BACKEND: u32 = TOKEN_DEVICE_BASE + 1;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;
const LINK_UP: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;

/// Where a backend waits between [`NetAttach::attach`] and the event loop taking it.
#[derive(Debug)]
struct Slot {
    backend: Mutex<Option<Box<dyn NetBackend>>>,
    taken: AtomicBool,
    evt: EventFd,
}

/// Gives a running device its backend, from any thread; once per device.
#[derive(Clone, Debug)]
pub struct NetAttach(Arc<Slot>);

impl NetAttach {
    /// Hands `backend` to the device; the event loop registers it and raises the link.
    pub fn attach(&self, backend: Box<dyn NetBackend>) -> Result<(), NetError> {
        if self.0.taken.swap(true, Ordering::SeqCst) {
            return Err(NetError::AlreadyAttached);
        }
        *lock(&self.0.backend) = Some(backend);
        self.0.evt.write(1).map_err(NetError::Wake)
    }
}

/// Frames the device moved or dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
}

/// A virtio-net device.
pub struct Net {
    mac: [u8; 6],
    acked: u64,
    activation: Activation,
    slot: Arc<Slot>,
    backend: Option<Box<dyn NetBackend>>,
    /// The frame read from the backend that waits for guest buffers (`rx_len` bytes).
    rx: Vec<u8>,
    rx_len: usize,
    tx: Vec<u8>,
    counters: NetCounters,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("link_up", &self.backend.is_some())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// What became of one frame for the guest.
enum Fill {
    Done,
    /// Dropped; whether guest buffers were returned (empty) for it.
    Dropped(bool),
    /// Too few buffers now: the frame waits.
    NoRoom,
}

impl Net {
    /// A device with MAC `mac` and no backend.
    pub fn new(mac: [u8; 6]) -> std::io::Result<Self> {
        Ok(Net {
            mac,
            acked: 0,
            activation: Activation::new("net")?,
            slot: Arc::new(Slot {
                backend: Mutex::new(None),
                taken: AtomicBool::new(false),
                evt: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
            backend: None,
            rx: vec![0; MAX_FRAME_LEN],
            rx_len: 0,
            tx: vec![0; MAX_FRAME_LEN],
            counters: NetCounters::default(),
        })
    }

    /// The handle that attaches this device's backend later.
    pub fn attach_handle(&self) -> NetAttach {
        NetAttach(self.slot.clone())
    }

    /// Frames moved and dropped so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Whether the link is up (a backend is attached).
    pub fn link_up(&self) -> bool {
        self.backend.is_some()
    }

    /// Starts serving `backend`: offloads as the driver accepted them, link up.
    fn install_backend(&mut self, mut backend: Box<dyn NetBackend>) {
        if self.activation.is_active() {
            if let Err(e) = backend.set_offloads(self.acked) {
                log::warn!("net: setting the backend's offloads: {e}");
            }
        }
        self.backend = Some(backend);
        if let Some(a) = self.activation.active() {
            a.interrupt.signal_config_change();
        }
        self.process_rx();
    }

    /// Takes the backend an attach handed over and registers its descriptor.
    fn take_backend(&mut self, ops: &mut EventOps) {
        let _ = self.slot.evt.read();
        let Some(backend) = lock(&self.slot.backend).take() else {
            return;
        };
        // Edge-triggered: the backend is read until it is empty or the guest has no room.
        let interest = EventSet::IN | EventSet::EDGE_TRIGGERED;
        let ev = Events::with_data_raw(backend.as_raw_fd(), TOKEN_BACKEND, interest);
        if let Err(e) = ops.add(ev) {
            log::error!("net: registering the backend: {e:?}");
            return;
        }
        self.install_backend(backend);
    }

    /// Moves the guest's frames from the TX queue to the backend (or drops them without
    /// one). Returns whether any buffer was used.
    pub fn process_tx(&mut self) -> bool {
        let Some(a) = self.activation.active() else {
            return false;
        };
        let (tx, backend, counters) = (&mut self.tx, &mut self.backend, &mut self.counters);
        a.consume(TXQ, |chain, mem| {
            let len = chain.reader(mem).ok().and_then(|r| read_frame(r, tx));
            let sent = match (len, backend.as_mut()) {
                (Some(len), Some(b)) => b
                    .write_frame(&tx[..len])
                    .map_err(|e| log::debug!("net: the backend refused a frame: {e}"))
                    .is_ok(),
                _ => false,
            };
            if sent {
                counters.tx_frames += 1;
            } else {
                counters.tx_dropped += 1;
            }
            0
        })
    }

    /// Fills guest RX buffers with frames from the backend until it has none or the guest
    /// has no room. Returns whether any buffer was used.
    pub fn process_rx(&mut self) -> bool {
        let mrg = self.acked & features::MRG_RXBUF != 0;
        let Some(a) = self.activation.active() else {
            return false;
        };
        let Some(backend) = self.backend.as_mut() else {
            return false;
        };
        let mut used = false;
        loop {
            if self.rx_len == 0 {
                match backend.read_frame(&mut self.rx) {
                    Ok(Some(n)) if n >= VNET_HDR_LEN => self.rx_len = n,
                    Ok(Some(_)) => {
                        self.counters.rx_dropped += 1;
                        continue;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::warn!("net: reading the backend: {e}");
                        break;
                    }
                }
            }
            let frame = &mut self.rx[..self.rx_len];
            match fill(&mut a.queues[RXQ].queue, &a.mem, frame, mrg) {
                Fill::Done => {
                    self.counters.rx_frames += 1;
                    used = true;
                }
                Fill::Dropped(returned) => {
                    self.counters.rx_dropped += 1;
                    used |= returned;
                }
                Fill::NoRoom => break,
            }
            self.rx_len = 0;
        }
        if used {
            a.signal_used(RXQ);
        }
        used
    }
}

/// Copies a TX chain (header and frame) into `buf`; `None` for a chain of a size no frame
/// has.
fn read_frame<B: vm_memory::bitmap::BitmapSlice>(
    mut r: virtio_queue::Reader<'_, B>,
    buf: &mut [u8],
) -> Option<usize> {
    let len = r.available_bytes();
    if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len) {
        log::debug!("net: dropping a TX chain of {len} bytes");
        return None;
    }
    r.read_exact(&mut buf[..len]).ok()?;
    Some(len)
}

/// Writes `frame` into as many of `q`'s buffers as it needs (one without mergeable
/// buffers), setting its `num_buffers`. Takes nothing from the queue when the buffers
/// available are too few for now.
fn fill(q: &mut Queue, mem: &GuestMemory, frame: &mut [u8], mrg: bool) -> Fill {
    let start = q.next_avail();
    let max = if mrg { usize::from(q.size()) } else { 1 };
    let mut chains = Vec::new();
    let mut room = 0;
    while room < frame.len() && chains.len() < max {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            q.set_next_avail(start);
            return Fill::NoRoom;
        };
        let head = chain.head_index();
        match chain.writer(mem) {
            Ok(w) if w.available_bytes() > 0 => {
                room += w.available_bytes();
                chains.push((head, w));
            }
            _ => {
                // A buffer no frame can go in: hand back everything taken, empty.
                log::debug!("net: unusable RX buffer");
                let heads = chains.iter().map(|(h, _)| *h).chain([head]);
                return_empty(q, mem, heads);
                return Fill::Dropped(true);
            }
        }
    }
    if room < frame.len() {
        log::debug!(
            "net: a {}-byte frame does not fit the guest's buffers",
            frame.len()
        );
        return_empty(q, mem, chains.iter().map(|(h, _)| *h));
        return Fill::Dropped(!chains.is_empty());
    }
    let count = chains.len() as u16;
    frame[NUM_BUFFERS..VNET_HDR_LEN].copy_from_slice(&count.to_le_bytes());
    let mut off = 0;
    for (head, mut w) in chains {
        let n = w.write(&frame[off..]).unwrap_or(0);
        off += n;
        if let Err(e) = q.add_used(mem, head, n as u32) {
            log::error!("net: RX add_used: {e:?}");
        }
    }
    Fill::Done
}

fn return_empty(q: &mut Queue, mem: &GuestMemory, heads: impl Iterator<Item = u16>) {
    for head in heads {
        if let Err(e) = q.add_used(mem, head, 0) {
            log::error!("net: RX add_used: {e:?}");
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        NET_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        features::OFFERED
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; le16 status; ... }
        let status = if self.backend.is_some() { LINK_UP } else { 0 };
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..].copy_from_slice(&status.to_le_bytes());
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

    fn reset(&mut self) -> bool {
        self.activation.deactivate();
        self.rx_len = 0;
        self.acked = 0;
        // Until the driver negotiates again, frames for it use no offload.
        if let Some(b) = self.backend.as_mut() {
            if let Err(e) = b.set_offloads(0) {
                log::warn!("net: clearing the backend's offloads: {e}");
            }
        }
        true
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.activation.handle(&events, ops) {
            DeviceEvent::Activated => {
                if let Some(b) = self.backend.as_mut() {
                    if let Err(e) = b.set_offloads(self.acked) {
                        log::warn!("net: setting the backend's offloads: {e}");
                    }
                }
                self.process_rx();
            }
            DeviceEvent::Queue(RXQ) | DeviceEvent::Device(TOKEN_BACKEND) => {
                self.process_rx();
            }
            DeviceEvent::Queue(TXQ) => {
                self.process_tx();
            }
            DeviceEvent::Device(TOKEN_ATTACH) => self.take_backend(ops),
            other => log::warn!("net: unexpected event {other:?}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        let ev = Events::with_data(&self.slot.evt, TOKEN_ATTACH, EventSet::IN);
        if let Err(e) = ops.add(ev) {
            log::error!("net: registering the attach eventfd: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests;
