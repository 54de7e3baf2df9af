//! The VMM's single device I/O thread: an event-manager epoll loop that owns every device
//! backend's file descriptors (queue notifications, host sockets). Devices subscribe before
//! the loop starts; a stop eventfd ends it.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitNotifier, VmExit};
use crate::seccomp::{self, SeccompError, ThreadKind};
use seccompiler::BpfProgram;

/// A subscriber shared with the rest of the VMM (a device is also on a bus).
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The text of a panic's payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Why the running loop stopped serving.
#[derive(Debug, thiserror::Error)]
enum LoopFailure {
    #[error("{0:?}")]
    Manager(event_manager::Error),
    #[error(transparent)]
    Seccomp(SeccompError),
}

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("event manager: {0}")]
    Manager(#[from] event_manager::Error),
    #[error("event loop eventfd or thread: {0}")]
    Io(#[from] std::io::Error),
}

struct Stopper {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event loop: registering stop eventfd: {e:?}");
        }
    }
}

/// The event loop before it runs.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    stop: EventFd,
    stopped: Arc<AtomicBool>,
    filter: Option<Arc<BpfProgram>>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").finish_non_exhaustive()
    }
}

impl EventLoop {
    /// An event loop with only its stop event.
    pub fn new() -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Subscriber>::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stopper: Subscriber = Arc::new(Mutex::new(Stopper {
            evt: stop.try_clone()?,
            stopped: stopped.clone(),
        }));
        manager.add_subscriber(stopper);
        Ok(EventLoop {
            filter: None,
            manager,
            stop,
            stopped,
        })
    }

    /// Adds a subscriber; its `init` registers its file descriptors.
    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Runs the loop on its own thread. If the loop fails or a device panics in it, the
    /// VM ends with [`VmExit::DeviceError`] (its devices would never answer again).
    pub fn spawn(mut self, exit: Arc<ExitNotifier>) -> Result<EventLoopThread, EventLoopError> {
        let stop = self.stop.try_clone()?;
        let handle = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                let filtered = match self.filter.take() {
                    Some(bpf) => seccomp::install_compiled(ThreadKind::Devices, &bpf),
                    None => Ok(()),
                };
                let outcome = match filtered {
                    Ok(()) => std::panic::catch_unwind(AssertUnwindSafe(|| self.run())),
                    Err(e) => Ok(Err(LoopFailure::Seccomp(e))),
                };
                let failure = match outcome {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => format!("event loop: {e}"),
                    Err(panic) => format!("a device panicked: {}", panic_message(&*panic)),
                };
                log::error!("{failure}");
                exit.report(VmExit::DeviceError { message: failure });
            })?;
        Ok(EventLoopThread { stop, handle })
    }

    /// The seccomp filter its thread installs before it serves the devices.
    pub fn set_filter(&mut self, filter: Option<Arc<BpfProgram>>) {
        self.filter = filter;
    }

    fn run(&mut self) -> Result<(), LoopFailure> {
        while !self.stopped.load(Ordering::SeqCst) {
            self.manager.run().map_err(LoopFailure::Manager)?;
        }
        Ok(())
    }
}

/// A running event loop.
#[derive(Debug)]
pub struct EventLoopThread {
    stop: EventFd,
    handle: JoinHandle<()>,
}

impl EventLoopThread {
    /// Stops the loop and waits for its thread.
    pub fn stop(self) {
        let _ = self.stop.write(1);
        if self.handle.join().is_err() {
            log::error!("event loop thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Echo {
        evt: EventFd,
        tx: mpsc::Sender<u64>,
    }

    impl MutEventSubscriber for Echo {
        fn process(&mut self, _e: Events, _ops: &mut EventOps) {
            let v = self.evt.read().unwrap();
            self.tx.send(v).unwrap();
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn dispatches_to_subscribers_and_stops() {
        let mut l = EventLoop::new().unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let echo: Subscriber = Arc::new(Mutex::new(Echo {
            evt: evt.try_clone().unwrap(),
            tx,
        }));
        l.add(echo);
        let t = l.spawn(Arc::new(ExitNotifier::new().unwrap())).unwrap();
        evt.write(5).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            5
        );
        t.stop();
    }

    struct Panics(EventFd);

    impl MutEventSubscriber for Panics {
        fn process(&mut self, _e: Events, _ops: &mut EventOps) {
            panic!("device model bug");
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.0, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn a_device_that_panics_ends_the_vm_with_a_clear_reason() {
        let mut l = EventLoop::new().unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        l.add(Arc::new(Mutex::new(Panics(evt.try_clone().unwrap()))));
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let t = l.spawn(exit.clone()).unwrap();
        evt.write(1).unwrap();
        let got = exit.wait_timeout(Some(std::time::Duration::from_secs(5)));
        assert_eq!(
            got.map(|e| e.to_string()),
            Some("device thread failed: a device panicked: device model bug".into())
        );
        t.stop();
    }
}
