//! What every virtio device model shares once the driver starts it: the live queues with
//! guest memory and the interrupt line (`ActiveQueues`), the hand-over from the vCPU thread
//! that sees DRIVER_OK to the event-loop thread that serves the queues (`Activation`), and
//! the used-ring notification rule.
//!
//! A device keeps one `Activation`. `activate` (vCPU thread, through the transport) stores
//! the queues and wakes the event loop through an eventfd; `handle` (event-loop thread)
//! registers the queue eventfds on that wake-up and turns every later event into a
//! [`DeviceEvent`] with the kick already consumed.

use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, QueueSnapshot, VirtioInterrupt, VirtioQueue};
use crate::memory::GuestMemory;

/// Event-loop token of the activation eventfd.
const TOKEN_ACTIVATE: u32 = 0;
/// Event-loop token of queue 0; queue `i` has `TOKEN_QUEUE_BASE + i`.
const TOKEN_QUEUE_BASE: u32 = 10;
/// First token a device may use for its own descriptors (a backend socket, a tap).
pub const TOKEN_DEVICE_BASE: u32 = 1;

/// A started device's queues and what serving them needs.
#[derive(Debug)]
pub struct ActiveQueues {
    pub mem: GuestMemory,
    pub interrupt: Arc<VirtioInterrupt>,
    pub queues: Vec<VirtioQueue>,
}

impl ActiveQueues {
    /// Interrupts the guest for queue `index` if its used ring changed in a way the driver
    /// asked to hear about (always, when the queue cannot tell).
    pub fn signal_used(&mut self, index: usize) {
        signal_used(&mut self.queues[index].queue, &self.mem, &self.interrupt);
    }

    /// Hands the next chain the guest made available on queue `index` to `f` (if there
    /// is one), gives it back as used with the length `f` returns and interrupts the
    /// guest if it asked to hear of it. Returns whether there was one.
    pub fn consume_one(
        &mut self,
        index: usize,
        f: impl FnOnce(DescriptorChain<&GuestMemory>, &GuestMemory) -> u32,
    ) -> bool {
        let q = &mut self.queues[index].queue;
        let Some(chain) = q.pop_descriptor_chain(&self.mem) else {
            return false;
        };
        let head = chain.head_index();
        let len = f(chain, &self.mem);
        if let Err(e) = q.add_used(&self.mem, head, len) {
            log::error!("virtio: queue {index}: add_used: {e:?}");
        }
        signal_used(q, &self.mem, &self.interrupt);
        true
    }

    /// Hands every chain the guest made available on queue `index` to `f`, gives each
    /// back as used with the length `f` returns (bytes written into it), and interrupts
    /// the guest once if any was. Returns whether any was.
    pub fn consume(
        &mut self,
        index: usize,
        mut f: impl FnMut(DescriptorChain<&GuestMemory>, &GuestMemory) -> u32,
    ) -> bool {
        let q = &mut self.queues[index].queue;
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let len = f(chain, &self.mem);
            if let Err(e) = q.add_used(&self.mem, head, len) {
                log::error!("virtio: queue {index}: add_used: {e:?}");
            }
            used = true;
        }
        if used {
            signal_used(q, &self.mem, &self.interrupt);
        }
        used
    }
}

/// Interrupts the guest for `q` if it needs a notification.
pub fn signal_used(q: &mut Queue, mem: &GuestMemory, interrupt: &VirtioInterrupt) {
    match q.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) => interrupt.signal_used_queue(),
        Err(e) => {
            log::debug!("virtio: needs_notification: {e:?}");
            interrupt.signal_used_queue();
        }
    }
}

/// What an event-loop event means for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The driver started the device: its queues are now served.
    Activated,
    /// The guest kicked queue `index` (the kick is consumed).
    Queue(usize),
    /// One of the device's own descriptors, registered with this token.
    Device(u32),
}

/// A device's activation state, shared by its transport side and its event-loop side.
#[derive(Debug)]
pub struct Activation {
    name: &'static str,
    evt: EventFd,
    active: Option<ActiveQueues>,
}

impl Activation {
    /// An inactive device called `name` in logs.
    pub fn new(name: &'static str) -> std::io::Result<Self> {
        Ok(Activation {
            name,
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
        })
    }

    /// Stores the driver's queues (exactly `need` of them) and wakes the event loop.
    pub fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<VirtioQueue>,
        need: usize,
    ) -> Result<(), ActivateError> {
        super::check_queue_count(&queues, need)?;
        self.active = Some(ActiveQueues {
            mem,
            interrupt,
            queues,
        });
        self.evt
            .write(1)
            .map_err(|e| ActivateError::Backend(format!("activate eventfd: {e}")))
    }

    /// Forgets the queues (driver reset).
    pub fn deactivate(&mut self) {
        self.active = None;
    }

    /// The live queues, once activated.
    pub fn active(&mut self) -> Option<&mut ActiveQueues> {
        self.active.as_mut()
    }

    /// The live queues' states, once activated.
    pub fn queue_states(&self) -> Option<Vec<QueueSnapshot>> {
        let a = self.active.as_ref()?;
        Some(
            a.queues
                .iter()
                .map(|q| QueueSnapshot::of(&q.queue))
                .collect(),
        )
    }

    /// Whether the driver started the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Registers the activation eventfd (from the device's `MutEventSubscriber::init`).
    pub fn init(&self, ops: &mut EventOps) {
        let ev = Events::with_data(&self.evt, TOKEN_ACTIVATE, EventSet::IN);
        if let Err(e) = ops.add(ev) {
            log::error!("{}: registering activate eventfd: {e:?}", self.name);
        }
    }

    /// Interprets an event-loop event (from the device's `MutEventSubscriber::process`).
    pub fn handle(&mut self, events: &Events, ops: &mut EventOps) -> DeviceEvent {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.evt.read();
                self.register_queues(ops);
                DeviceEvent::Activated
            }
            t if t >= TOKEN_QUEUE_BASE => {
                let index = (t - TOKEN_QUEUE_BASE) as usize;
                if let Some(q) = self.active.as_ref().and_then(|a| a.queues.get(index)) {
                    let _ = q.notify.read();
                }
                DeviceEvent::Queue(index)
            }
            t => DeviceEvent::Device(t),
        }
    }

    fn register_queues(&self, ops: &mut EventOps) {
        let Some(a) = &self.active else { return };
        for (i, q) in a.queues.iter().enumerate() {
            let ev = Events::with_data(&q.notify, TOKEN_QUEUE_BASE + i as u32, EventSet::IN);
            if let Err(e) = ops.add(ev) {
                log::error!("{}: registering queue {i}: {e:?}", self.name);
            }
        }
    }
}
