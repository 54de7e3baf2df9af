//! The net device driven through mock queues by a test guest and an in-memory backend:
//! frames both ways with their offload headers intact, a frame merged over many RX
//! buffers, the link before and after a backend, back-pressure from a guest that posts no
//! RX buffers, frames that cannot fit, and malformed TX chains.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::test_rings::{Ring, F_NEXT, F_WRITE};
use crate::devices::IrqLine;

const QSIZE: u16 = 256;
const RX_BUF_BASE: u64 = 0x10_0000;
const RX_STRIDE: u64 = 0x1000;
const TX_BUF: u64 = 0x80_0000;

#[derive(Debug, Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    offloads: Option<u64>,
    reads: usize,
}

/// A backend whose frames live in memory.
#[derive(Debug)]
struct Fake {
    wire: Arc<Mutex<Wire>>,
    fd: EventFd,
}

impl AsRawFd for Fake {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for Fake {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        let mut w = lock(&self.wire);
        w.reads += 1;
        Ok(w.to_guest.pop_front().map(|f| {
            buf[..f.len()].copy_from_slice(&f);
            f.len()
        }))
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        lock(&self.wire).from_guest.push(frame.to_vec());
        Ok(())
    }
    fn set_offloads(&mut self, guest_features: u64) -> std::io::Result<()> {
        lock(&self.wire).offloads = Some(guest_features);
        Ok(())
    }
}

struct Guest {
    mem: GuestMemory,
    dev: Net,
    irq: Arc<VirtioInterrupt>,
    wire: Arc<Mutex<Wire>>,
    rx: Ring,
    tx: Ring,
    rx_len: u32,
    next_rx: u16,
}

/// A header: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
fn header(gso_type: u8, gso_size: u16) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    h[1] = gso_type;
    h[2..4].copy_from_slice(&54u16.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&34u16.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    h
}

fn frame(gso_type: u8, gso_size: u16, len: usize, seed: u8) -> Vec<u8> {
    let mut f = header(gso_type, gso_size).to_vec();
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

impl Guest {
    /// A driver that accepted `features` and posted `bufs` RX buffers of `rx_len` bytes.
    fn new(features: u64, bufs: u16, rx_len: u32) -> Self {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let rx = Ring::new(&mem, 0x1_0000, QSIZE);
        let tx = Ring::new(&mem, 0x2_0000, QSIZE);
        let mut dev = Net::new([2, 0, 0, 0, 0, 1]).unwrap();
        dev.ack_features(features);
        let irq = Arc::new(VirtioInterrupt::new(IrqLine::new(5).unwrap()));
        dev.activate(mem.clone(), irq.clone(), vec![rx.queue(), tx.queue()])
            .unwrap();
        let mut g = Guest {
            mem,
            dev,
            irq,
            wire: Default::default(),
            rx,
            tx,
            rx_len,
            next_rx: 0,
        };
        g.post_rx(bufs);
        g
    }

    fn attach(&mut self) {
        let fake = Fake {
            wire: self.wire.clone(),
            fd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        // What the event loop does on the attach handle's wake-up, without the loop.
        self.dev.attach_handle().attach(Box::new(fake)).unwrap();
        let backend = lock(&self.dev.slot.backend).take().unwrap();
        self.dev.install_backend(backend);
    }

    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let i = self.next_rx % QSIZE;
            let addr = RX_BUF_BASE + u64::from(i) * RX_STRIDE.max(u64::from(self.rx_len));
            self.rx.desc(i, addr, self.rx_len, F_WRITE, 0);
            self.rx.publish(i);
            self.next_rx = self.next_rx.wrapping_add(1);
        }
    }

    fn buffer(&self, id: u16, len: u32) -> Vec<u8> {
        let addr = RX_BUF_BASE + u64::from(id) * RX_STRIDE.max(u64::from(self.rx_len));
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    /// The frames the guest received, reassembled from their buffers by `num_buffers`.
    fn received(&mut self) -> Vec<Vec<u8>> {
        let used = self.rx.take_used();
        let mut out = Vec::new();
        let mut it = used.into_iter();
        while let Some((id, len)) = it.next() {
            let mut f = self.buffer(id, len);
            let n = u16::from_le_bytes([f[10], f[11]]);
            for _ in 1..n {
                let (id, len) = it.next().expect("num_buffers beyond the used entries");
                f.extend(self.buffer(id, len));
            }
            out.push(f);
        }
        out
    }

    /// Sends `f` from the guest as a header descriptor and a data descriptor.
    fn send(&mut self, f: &[u8]) {
        self.mem.write_slice(f, GuestAddress(TX_BUF)).unwrap();
        self.tx.desc(0, TX_BUF, VNET_HDR_LEN as u32, F_NEXT, 1);
        let data = (f.len() - VNET_HDR_LEN) as u32;
        self.tx.desc(1, TX_BUF + VNET_HDR_LEN as u64, data, 0, 0);
        self.tx.publish(0);
        self.dev.process_tx();
    }
}

const ALL: u64 = features::OFFERED;

#[test]
fn frames_cross_both_ways_with_their_offload_headers() {
    let mut g = Guest::new(ALL, 64, 2048);
    g.attach();
    assert_eq!(
        lock(&g.wire).offloads,
        Some(ALL),
        "offloads follow the driver"
    );
    let sent = [
        frame(0, 0, 60, 1),
        frame(1, 1448, 1500, 2),
        frame(3, 1440, 900, 3),
    ];
    for f in &sent {
        g.send(f);
    }
    assert_eq!(lock(&g.wire).from_guest, sent.to_vec());
    assert_eq!(g.tx.take_used().len(), 3);
    let incoming = [frame(0, 0, 42, 7), frame(1, 1448, 1400, 8)];
    lock(&g.wire).to_guest.extend(incoming.iter().cloned());
    g.dev.process_rx();
    let got = g.received();
    assert_eq!(got.len(), 2);
    for (g, mut want) in got.into_iter().zip(incoming) {
        want[10..12].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(g, want);
    }
    assert_eq!(g.dev.counters().rx_frames, 2);
    assert_eq!(g.dev.counters().tx_frames, 3);
}

#[test]
fn a_segmentation_frame_spans_merged_buffers() {
    let mut g = Guest::new(ALL, 64, 2048);
    g.attach();
    let big = frame(1, 1448, 60_000, 9);
    lock(&g.wire).to_guest.push_back(big.clone());
    g.dev.process_rx();
    let got = g.received();
    assert_eq!(got.len(), 1);
    let n = u16::from_le_bytes([got[0][10], got[0][11]]);
    assert_eq!(usize::from(n), big.len().div_ceil(2048));
    assert_eq!(got[0][..10], big[..10], "offload header fields changed");
    assert_eq!(got[0][12..], big[12..]);
}

#[test]
fn the_link_is_down_and_frames_dropped_until_a_backend_is_attached() {
    let mut g = Guest::new(ALL, 8, 2048);
    let status = |g: &Guest| {
        let mut b = [0u8; 2];
        g.dev.read_config(6, &mut b);
        u16::from_le_bytes(b)
    };
    let mut mac = [0u8; 6];
    g.dev.read_config(0, &mut mac);
    assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
    assert_eq!(status(&g), 0);
    g.send(&frame(0, 0, 60, 1));
    assert_eq!(
        g.tx.take_used().len(),
        1,
        "a frame without backend is still consumed"
    );
    assert_eq!(g.dev.counters().tx_dropped, 1);
    assert!(!g.dev.process_rx());
    g.irq.ack(u32::MAX);
    g.attach();
    assert_eq!(status(&g), LINK_UP);
    assert_ne!(
        g.irq.status() & VirtioInterrupt::CONFIG,
        0,
        "no config interrupt"
    );
    let again = Fake {
        wire: g.wire.clone(),
        fd: EventFd::new(0).unwrap(),
    };
    let second = g.dev.attach_handle().attach(Box::new(again));
    assert!(
        matches!(second, Err(NetError::AlreadyAttached)),
        "{second:?}"
    );
}

#[test]
fn a_guest_that_posts_no_rx_buffers_holds_one_frame_and_stops_reading() {
    let mut g = Guest::new(ALL, 0, 2048);
    g.attach();
    lock(&g.wire)
        .to_guest
        .extend((0..1000).map(|i| frame(0, 0, 100, i as u8)));
    let reads = lock(&g.wire).reads;
    for _ in 0..10 {
        g.dev.process_rx();
    }
    let held = lock(&g.wire).reads - reads;
    assert_eq!(held, 1, "read more than the one frame it can hold");
    assert!(g.received().is_empty());
    g.post_rx(4);
    g.dev.process_rx();
    let got = g.received();
    assert_eq!(got.len(), 4);
    assert_eq!(
        got[0][12..],
        frame(0, 0, 100, 0)[12..],
        "the held frame came first"
    );
    let w = lock(&g.wire);
    assert_eq!(w.reads - reads, 5);
    assert_eq!(w.to_guest.len(), 995);
}

#[test]
fn a_frame_too_big_for_one_buffer_is_dropped_without_mergeable_buffers() {
    let mut g = Guest::new(ALL & !features::MRG_RXBUF, 4, 2048);
    g.attach();
    lock(&g.wire)
        .to_guest
        .extend([frame(0, 0, 3000, 1), frame(0, 0, 100, 2)]);
    g.dev.process_rx();
    let used = g.rx.take_used();
    assert_eq!(used.len(), 2);
    assert_eq!(used[0].1, 0, "the dropped frame's buffer comes back empty");
    assert_eq!(used[1].1 as usize, VNET_HDR_LEN + 100);
    assert_eq!(g.dev.counters().rx_dropped, 1);
}

#[test]
fn malformed_tx_chains_are_dropped_and_consumed() {
    let mut g = Guest::new(ALL, 4, 2048);
    g.attach();
    // Shorter than a header.
    g.tx.desc(0, TX_BUF, 4, 0, 0);
    g.tx.publish(0);
    // Outside guest memory.
    g.tx.desc(1, 1 << 40, 100, 0, 0);
    g.tx.publish(1);
    // Larger than any frame.
    g.tx.desc(3, TX_BUF, (MAX_FRAME_LEN + 1) as u32, 0, 0);
    g.tx.publish(3);
    g.dev.process_tx();
    assert_eq!(g.tx.take_used().len(), 3);
    assert!(lock(&g.wire).from_guest.is_empty());
    assert_eq!(g.dev.counters().tx_dropped, 3);
    // A descriptor that chains to itself ends after as many descriptors as the queue has
    // entries: at worst one frame of guest memory the guest itself owns.
    g.tx.desc(2, TX_BUF, 64, F_NEXT, 2);
    g.tx.publish(2);
    g.dev.process_tx();
    assert_eq!(g.tx.take_used().len(), 1);
    assert!(lock(&g.wire)
        .from_guest
        .iter()
        .all(|f| f.len() <= usize::from(QSIZE) * 64));
    let before = lock(&g.wire).from_guest.len();
    g.send(&frame(0, 0, 60, 1));
    assert_eq!(
        lock(&g.wire).from_guest.len(),
        before + 1,
        "the device stopped after bad chains"
    );
}

#[test]
fn an_rx_buffer_the_device_cannot_write_drops_one_frame() {
    let mut g = Guest::new(ALL, 0, 2048);
    g.attach();
    // A read-only buffer, then a good one.
    g.rx.desc(0, RX_BUF_BASE, 2048, 0, 0);
    g.rx.publish(0);
    g.next_rx = 1;
    g.post_rx(1);
    lock(&g.wire)
        .to_guest
        .extend([frame(0, 0, 100, 1), frame(0, 0, 100, 2)]);
    g.dev.process_rx();
    let used = g.rx.take_used();
    assert_eq!(used, vec![(0, 0), (1, (VNET_HDR_LEN + 100) as u32)]);
}
