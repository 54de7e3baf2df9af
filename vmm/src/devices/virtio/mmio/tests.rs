//! Register-level tests of the virtio-mmio transport, driven the way the Linux driver
//! drives it, with rings laid out by virtio-queue's mock.

use std::sync::{Arc, Mutex};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::{ActivateError, QueueSnapshot};
use crate::devices::IrqLine;

const DEVICE_FEATURE: u64 = 1 << 3;

#[derive(Default)]
struct Dummy {
    config: [u8; 8],
    acked: u64,
    activated: Option<Vec<VirtioQueue>>,
    resets: usize,
    can_reset: bool,
    fail_activate: bool,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        DEVICE_FEATURE | VIRTIO_RING_F_EVENT_IDX
    }
    fn ack_features(&mut self, f: u64) {
        self.acked = f;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let o = offset as usize;
        data.copy_from_slice(&self.config[o..o + data.len()]);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.config[o..o + data.len()].copy_from_slice(data);
    }
    fn activate(
        &mut self,
        _mem: GuestMemory,
        _i: Arc<VirtioInterrupt>,
        queues: Vec<VirtioQueue>,
    ) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::Backend("no".into()));
        }
        self.activated = Some(queues);
        Ok(())
    }
    fn queue_states(&self) -> Option<Vec<QueueSnapshot>> {
        let queues = self.activated.as_ref()?;
        Some(queues.iter().map(|q| QueueSnapshot::of(&q.queue)).collect())
    }
    fn reset(&mut self) -> bool {
        self.resets += 1;
        self.activated = None;
        self.can_reset
    }
}

struct Fixture {
    mem: GuestMemory,
    dev: Arc<Mutex<Dummy>>,
    t: MmioTransport,
    irq: EventFd,
}

fn fixture() -> Fixture {
    let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
    let dev = Arc::new(Mutex::new(Dummy {
        config: *b"ABCDEFGH",
        can_reset: true,
        ..Default::default()
    }));
    let line = IrqLine::new(5).unwrap();
    let irq = line.eventfd().try_clone().unwrap();
    let t = MmioTransport::new(
        dev.clone(),
        mem.clone(),
        Arc::new(VirtioInterrupt::new(line)),
    )
    .unwrap();
    Fixture { mem, dev, t, irq }
}

fn r(t: &mut MmioTransport, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(off.into(), &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, off: u32, v: u32) {
    t.write(off.into(), &v.to_le_bytes());
}

/// Negotiates features and sets up both queues with rings from `qs`.
fn drive_to_driver_ok(t: &mut MmioTransport, qs: &[&MockSplitQueue<GuestMemory>], features: u64) {
    w(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    w(t, VIRTIO_MMIO_STATUS, s);
    for (i, q) in qs.iter().enumerate() {
        w(t, VIRTIO_MMIO_QUEUE_SEL, i as u32);
        w(t, VIRTIO_MMIO_QUEUE_NUM, 16);
        let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
        let (l, h) = split(q.desc_table_addr());
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, l);
        w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, h);
        let (l, h) = split(q.avail_addr());
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, l);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, h);
        let (l, h) = split(q.used_addr());
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, l);
        w(t, VIRTIO_MMIO_QUEUE_USED_HIGH, h);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    w(t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
}

#[test]
fn identification_registers() {
    let mut f = fixture();
    assert_eq!(r(&mut f.t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut f.t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r(&mut f.t, VIRTIO_MMIO_DEVICE_ID), 42);
    w(&mut f.t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let lo = r(&mut f.t, VIRTIO_MMIO_DEVICE_FEATURES) as u64;
    w(&mut f.t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let hi = r(&mut f.t, VIRTIO_MMIO_DEVICE_FEATURES) as u64;
    assert_eq!(
        lo | hi << 32,
        DEVICE_FEATURE | VIRTIO_RING_F_EVENT_IDX | VIRTIO_F_VERSION_1
    );
    w(&mut f.t, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(r(&mut f.t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
    w(&mut f.t, VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(r(&mut f.t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    // Misaligned or narrow register accesses read as zero.
    let mut b = [0xffu8; 2];
    f.t.read(0, &mut b);
    assert_eq!(b, [0, 0]);
}

#[test]
fn config_space_reads_and_writes_reach_the_device() {
    let mut f = fixture();
    let mut b = [0u8; 2];
    f.t.read(0x102, &mut b);
    assert_eq!(&b, b"CD");
    let gen = r(&mut f.t, VIRTIO_MMIO_CONFIG_GENERATION);
    f.t.write(0x100, b"zz");
    assert_eq!(&f.dev.lock().unwrap().config[..2], b"zz");
    assert_ne!(r(&mut f.t, VIRTIO_MMIO_CONFIG_GENERATION), gen);
}

#[test]
fn activation_hands_over_working_queues() {
    let mut f = fixture();
    let q0 = MockSplitQueue::create(&f.mem, GuestAddress(0x10000), 16);
    let q1 = MockSplitQueue::create(&f.mem, GuestAddress(0x20000), 16);
    let features = VIRTIO_F_VERSION_1 | DEVICE_FEATURE;
    drive_to_driver_ok(&mut f.t, &[&q0, &q1], features);
    assert!(f.t.is_active());
    assert_eq!(f.dev.lock().unwrap().acked, features);

    // The guest posts a buffer on queue 1 and kicks it through the register.
    f.mem.write_slice(b"ping", GuestAddress(0x100000)).unwrap();
    q1.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(0x100000, 4, 0, 0))],
        0,
    )
    .unwrap();
    w(&mut f.t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);

    let mut dev = f.dev.lock().unwrap();
    let queues = dev.activated.as_mut().unwrap();
    assert_eq!(queues.len(), 2);
    assert_eq!(queues[1].notify.read().unwrap(), 1);
    assert!(queues[0].notify.read().is_err(), "queue 0 was not kicked");
    let chain = queues[1].queue.pop_descriptor_chain(&f.mem).unwrap();
    let mut buf = [0u8; 4];
    chain
        .memory()
        .read_slice(&mut buf, GuestAddress(0x100000))
        .unwrap();
    assert_eq!(&buf, b"ping");
    // Queue registers are frozen once the device runs.
    drop(dev);
    w(&mut f.t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(&mut f.t, VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(r(&mut f.t, VIRTIO_MMIO_QUEUE_READY), 1);
}

#[test]
fn features_outside_the_offer_are_refused() {
    let mut f = fixture();
    w(
        &mut f.t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 7);
    w(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(
        &mut f.t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(
        r(&mut f.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
        0
    );
}

#[test]
fn legacy_driver_without_version_1_is_refused() {
    let mut f = fixture();
    w(
        &mut f.t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES, DEVICE_FEATURE as u32);
    w(
        &mut f.t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(
        r(&mut f.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
        0
    );
}

#[test]
fn invalid_rings_need_reset_instead_of_activating() {
    let mut f = fixture();
    let q0 = MockSplitQueue::create(&f.mem, GuestAddress(0x10000), 16);
    // Queue 1 points outside guest memory.
    let q1 = MockSplitQueue::create(&f.mem, GuestAddress(0x20000), 16);
    w(&mut f.t, VIRTIO_MMIO_QUEUE_SEL, 1);
    drive_to_driver_ok(&mut f.t, &[&q0, &q1], VIRTIO_F_VERSION_1);
    assert!(f.t.is_active());
    // Start again with a bad ring address.
    w(&mut f.t, VIRTIO_MMIO_STATUS, 0);
    let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    w(&mut f.t, VIRTIO_MMIO_STATUS, s);
    w(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(
        &mut f.t,
        VIRTIO_MMIO_STATUS,
        s | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    w(&mut f.t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(&mut f.t, VIRTIO_MMIO_QUEUE_NUM, 16);
    w(&mut f.t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xffff_0000);
    w(&mut f.t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10);
    w(&mut f.t, VIRTIO_MMIO_QUEUE_READY, 1);
    w(
        &mut f.t,
        VIRTIO_MMIO_STATUS,
        s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert!(!f.t.is_active());
    assert_ne!(
        r(&mut f.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}

#[test]
fn reset_returns_to_initial_state_and_resets_device() {
    let mut f = fixture();
    let q0 = MockSplitQueue::create(&f.mem, GuestAddress(0x10000), 16);
    let q1 = MockSplitQueue::create(&f.mem, GuestAddress(0x20000), 16);
    drive_to_driver_ok(&mut f.t, &[&q0, &q1], VIRTIO_F_VERSION_1);
    w(&mut f.t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut f.t, VIRTIO_MMIO_STATUS), 0);
    assert!(!f.t.is_active());
    assert_eq!(f.dev.lock().unwrap().resets, 1);
    w(&mut f.t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut f.t, VIRTIO_MMIO_QUEUE_READY), 0);
    // And it can be brought up again.
    drive_to_driver_ok(&mut f.t, &[&q0, &q1], VIRTIO_F_VERSION_1);
    assert!(f.t.is_active());
}

#[test]
fn failed_activation_sets_needs_reset_and_interrupts() {
    let mut f = fixture();
    f.dev.lock().unwrap().fail_activate = true;
    let q0 = MockSplitQueue::create(&f.mem, GuestAddress(0x10000), 16);
    let q1 = MockSplitQueue::create(&f.mem, GuestAddress(0x20000), 16);
    drive_to_driver_ok(&mut f.t, &[&q0, &q1], VIRTIO_F_VERSION_1);
    assert!(!f.t.is_active());
    assert_ne!(
        r(&mut f.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
    assert_eq!(
        r(&mut f.t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VirtioInterrupt::CONFIG
    );
    assert_eq!(f.irq.read().unwrap(), 1);
    w(&mut f.t, VIRTIO_MMIO_INTERRUPT_ACK, VirtioInterrupt::CONFIG);
    assert_eq!(r(&mut f.t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn status_bits_cannot_be_cleared_without_reset() {
    let mut f = fixture();
    w(
        &mut f.t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w(&mut f.t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(
        r(&mut f.t, VIRTIO_MMIO_STATUS),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    );
}

#[test]
fn a_saved_transport_restores_its_registers_and_its_devices_queues() {
    let mut f = fixture();
    let q0 = MockSplitQueue::create(&f.mem, GuestAddress(0x10000), 16);
    let q1 = MockSplitQueue::create(&f.mem, GuestAddress(0x20000), 16);
    let features = VIRTIO_F_VERSION_1 | DEVICE_FEATURE | VIRTIO_RING_F_EVENT_IDX;
    drive_to_driver_ok(&mut f.t, &[&q0, &q1], features);
    // The device served one chain of queue 1: its position moved past the transport's.
    q1.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(0x100000, 4, 0, 0))],
        0,
    )
    .unwrap();
    {
        let mut dev = f.dev.lock().unwrap();
        let q = &mut dev.activated.as_mut().unwrap()[1].queue;
        let chain = q.pop_descriptor_chain(&f.mem).unwrap();
        q.add_used(&f.mem, chain.head_index(), 0).unwrap();
    }
    f.t.interrupt.signal_used_queue();
    let saved = {
        let dev = f.dev.lock().unwrap();
        f.t.save_state(&*dev)
    };
    assert!(saved.active);
    let live = saved.live.as_ref().unwrap();
    assert_eq!((live[1].next_avail, live[1].next_used), (1, 1));
    assert_eq!(saved.queues[1].next_avail, 0, "the transport's copy stays");

    // A new transport and device, as a new VMM builds them, take the state.
    let g = fixture();
    let mut t = g.t;
    t.restore_state(&saved).unwrap();
    assert!(t.is_active());
    assert_eq!(t.status(), saved.status);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VirtioInterrupt::VRING
    );
    let dev = g.dev.lock().unwrap();
    assert_eq!(dev.acked, features);
    let queues = dev.activated.as_ref().unwrap();
    let q = &queues[1].queue;
    assert_eq!((q.next_avail(), q.next_used()), (1, 1));
    assert!(q.event_idx_enabled());
    for (i, q) in queues.iter().enumerate() {
        assert_eq!(q.notify.read().unwrap(), 1, "queue {i} is kicked once");
    }
    drop(dev);
    let mut back = t.save_state(&*g.dev.lock().unwrap());
    back.config_generation = saved.config_generation;
    assert_eq!(back, saved, "what was restored saves the same");

    // A state of another device type, or queues that do not fit, are refused.
    let mut other = saved.clone();
    other.device_type = 7;
    assert!(fixture().t.restore_state(&other).is_err());
    let mut short = saved.clone();
    short.queues.pop();
    assert!(fixture().t.restore_state(&short).is_err());
}
