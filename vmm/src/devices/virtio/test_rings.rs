//! A test guest's side of one split virtqueue, for device model tests: descriptors and the
//! avail ring written the way a driver writes them, and the used ring read back.
//! virtio-queue's `MockSplitQueue` lays out the rings; the used ring is moved a page after
//! the avail ring (`MockSplitQueue::create` places it right after the first `len` bytes of
//! the avail ring, which overlaps that ring once more than len/2 buffers are posted).

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioQueue;
use crate::memory::GuestMemory;

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// One queue as the test guest drives it.
pub struct Ring {
    mem: GuestMemory,
    mock: MockSplitQueue<'static, GuestMemory>,
    size: u16,
    avail: u16,
    used_seen: u16,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("size", &self.size)
            .field("avail", &self.avail)
            .field("used_seen", &self.used_seen)
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// A ring of `size` entries at `base` in `mem`.
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        // The mock borrows guest memory for its lifetime; a test leaks one small mapping
        // handle per ring to keep the borrow 'static.
        let leaked: &'static GuestMemory = Box::leak(Box::new(mem.clone()));
        Ring {
            mem: mem.clone(),
            mock: MockSplitQueue::create(leaked, GuestAddress(base), size),
            size,
            avail: 0,
            used_seen: 0,
        }
    }

    fn used_ring(&self) -> u64 {
        self.mock.avail_addr().0 + 0x1000
    }

    /// The device's view of the ring, ready, with its notification eventfd.
    pub fn queue(&self) -> VirtioQueue {
        let mut q: Queue = self.mock.create_queue().unwrap();
        let used = self.used_ring();
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        VirtioQueue {
            queue: q,
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    /// Writes descriptor `index`.
    pub fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = self.mock.desc_table_addr().0 + u64::from(index) * 16;
        let m = &self.mem;
        m.write_obj(addr, GuestAddress(base)).unwrap();
        m.write_obj(len, GuestAddress(base + 8)).unwrap();
        m.write_obj(flags, GuestAddress(base + 12)).unwrap();
        m.write_obj(next, GuestAddress(base + 14)).unwrap();
    }

    /// Makes the chain starting at descriptor `head` available to the device.
    pub fn publish(&mut self, head: u16) {
        let avail = self.mock.avail_addr().0;
        let slot = u64::from(self.avail % self.size);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + slot * 2))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail, GuestAddress(avail + 2))
            .unwrap();
    }

    /// The used entries (chain head, length) the device added since the last call.
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let used = self.used_ring();
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = used + 4 + u64::from(self.used_seen % self.size) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
