//! A minimal guest side for driving the vsock device in tests: split rings laid out by
//! virtio-queue's `MockSplitQueue`, RX buffers the device fills, TX packets it consumes,
//! and per-connection credit accounting as a well-behaved guest kernel does it.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::test_rings::{Ring, F_NEXT, F_WRITE};
use crate::devices::virtio::vsock::unix::VsockMuxer;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::vsock::{op, HOST_CID, TYPE_STREAM};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::IrqLine;
use crate::memory::GuestMemory;

pub const GUEST_CID: u64 = 3;
pub const HDR: usize = 44;
const RX_BUFS: u16 = 64;
const RX_DATA: u32 = 4096;
const QSIZE: u16 = 256;
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
const EV_RING: u64 = 0x3_0000;
const RX_BUF_BASE: u64 = 0x10_0000;
const TX_BUF: u64 = 0x80_0000;
pub const EV_BUF: u64 = 0x90_0000;
/// Buffer space the guest advertises per connection.
pub const GUEST_BUF_ALLOC: u32 = 256 * 1024;

/// A packet as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub src_port: u32,
    pub dst_port: u32,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    pub data: Vec<u8>,
}

pub struct Driver {
    pub mem: GuestMemory,
    pub dev: Vsock<VsockMuxer>,
    rx: Ring,
    tx: Ring,
    pub ev: Ring,
    /// Bytes the guest consumed per (local, peer) port pair: its fwd_cnt.
    pub fwd: std::collections::HashMap<(u32, u32), u32>,
}

impl Driver {
    pub fn new(path: &std::path::Path) -> Self {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let rx = Ring::new(&mem, RX_RING, QSIZE);
        let tx = Ring::new(&mem, TX_RING, QSIZE);
        let ev = Ring::new(&mem, EV_RING, 16);
        let muxer = VsockMuxer::new(GUEST_CID, path).unwrap();
        let mut dev = Vsock::new(GUEST_CID, muxer).unwrap();
        let queues = vec![rx.queue(), tx.queue(), ev.queue()];
        let irq = Arc::new(VirtioInterrupt::new(IrqLine::new(5).unwrap()));
        dev.activate(mem.clone(), irq, queues).unwrap();
        let mut d = Driver {
            mem,
            dev,
            rx,
            tx,
            ev,
            fwd: Default::default(),
        };
        for i in 0..RX_BUFS {
            d.post_rx(i);
        }
        d
    }

    /// Posts RX buffer `i` (descriptors 2i and 2i+1).
    fn post_rx(&mut self, i: u16) {
        let hdr = RX_BUF_BASE + u64::from(i) * 0x2000;
        self.rx
            .desc(2 * i, hdr, HDR as u32, F_WRITE | F_NEXT, 2 * i + 1);
        self.rx.desc(2 * i + 1, hdr + 0x100, RX_DATA, F_WRITE, 0);
        self.rx.publish(2 * i);
    }

    /// Posts event buffer 0 (8 bytes at `EV_BUF`) as the guest's driver does.
    pub fn post_event_buffer(&mut self) {
        self.ev.desc(0, EV_BUF, 8, F_WRITE, 0);
        self.ev.publish(0);
    }

    /// Sends one packet from the guest.
    pub fn send(&mut self, p: &Pkt) {
        let mut h = [0u8; HDR];
        h[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
        h[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
        h[16..20].copy_from_slice(&p.src_port.to_le_bytes());
        h[20..24].copy_from_slice(&p.dst_port.to_le_bytes());
        h[24..28].copy_from_slice(&(p.data.len() as u32).to_le_bytes());
        h[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        h[30..32].copy_from_slice(&p.op.to_le_bytes());
        h[32..36].copy_from_slice(&p.flags.to_le_bytes());
        h[36..40].copy_from_slice(&p.buf_alloc.to_le_bytes());
        h[40..44].copy_from_slice(&p.fwd_cnt.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(TX_BUF)).unwrap();
        self.mem
            .write_slice(&p.data, GuestAddress(TX_BUF + 0x100))
            .unwrap();
        if p.data.is_empty() {
            self.tx.desc(0, TX_BUF, HDR as u32, 0, 0);
        } else {
            self.tx.desc(0, TX_BUF, HDR as u32, F_NEXT, 1);
            self.tx.desc(1, TX_BUF + 0x100, p.data.len() as u32, 0, 0);
        }
        self.tx.publish(0);
        self.dev.process_tx();
    }

    /// A control packet from guest port `src` to host port `dst` carrying the guest's
    /// current credit for that connection.
    pub fn control(&mut self, src: u32, dst: u32, op: u16, flags: u32) {
        let fwd = *self.fwd.get(&(dst, src)).unwrap_or(&0);
        self.send(&Pkt {
            src_port: src,
            dst_port: dst,
            op,
            flags,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: fwd,
            data: Vec::new(),
        });
    }

    /// Lets the backend and the device work, and returns the packets the guest received.
    pub fn pump(&mut self) -> Vec<Pkt> {
        self.dev
            .handle_backend_event(vmm_sys_util::epoll::EventSet::IN);
        self.dev.process_rx();
        let mut out = Vec::new();
        for (id, _) in self.rx.take_used() {
            let i = id / 2;
            let hdr_addr = RX_BUF_BASE + u64::from(i) * 0x2000;
            let mut h = [0u8; HDR];
            self.mem.read_slice(&mut h, GuestAddress(hdr_addr)).unwrap();
            let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
            let len = u32_at(24) as usize;
            let mut data = vec![0u8; len];
            self.mem
                .read_slice(&mut data, GuestAddress(hdr_addr + 0x100))
                .unwrap();
            let p = Pkt {
                src_port: u32_at(16),
                dst_port: u32_at(20),
                op: u16::from_le_bytes([h[30], h[31]]),
                flags: u32_at(32),
                buf_alloc: u32_at(36),
                fwd_cnt: u32_at(40),
                data,
            };
            assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), GUEST_CID);
            if p.op == op::RW {
                // The guest application consumes the data at once.
                *self.fwd.entry((p.src_port, p.dst_port)).or_default() += p.data.len() as u32;
            }
            out.push(p);
            self.post_rx(i);
        }
        out
    }

    /// Pumps until `f` is satisfied by the packets collected so far, or panics after 10 s.
    pub fn pump_until(&mut self, mut f: impl FnMut(&[Pkt]) -> bool) -> Vec<Pkt> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut all = Vec::new();
        loop {
            all.extend(self.pump());
            if f(&all) {
                return all;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out; got {all:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
