//! A built VM and its life: `Vmm::start` spawns the event loop and one thread per vCPU;
//! `VmHandle` stops, pauses and resumes it from any thread; `RunningVm::snapshot` saves
//! it; `RunningVm::wait` blocks until it ends, joins every thread and says why it ended.

use std::path::Path;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use crate::builder::{BuildError, DeviceHandles, VmInfo};
use crate::bus::lock;
use crate::devices::serial::ConsoleWatch;
use crate::devices::virtio::VirtioDevice;
use crate::event_loop::{EventLoop, EventLoopThread};
use crate::exit::{ExitNotifier, VmExit};
use crate::memory::GuestMemory;
use crate::snapshot::{self, Shape, SnapshotError, VmKvmState, VmState};
use crate::vcpu::{RunState, Vcpu, VcpuControl, VcpuThread};
use crate::vm::Vm;

/// How long the vCPUs may take to park and save their state for a snapshot.
const SAVE_TIMEOUT: Duration = Duration::from_secs(30);

/// A built VM, not yet running; the builder (see `builder`) fills it in.
pub struct Vmm {
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemory,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) events: EventLoop,
    pub(crate) exit: Arc<ExitNotifier>,
    pub(crate) watch: Arc<ConsoleWatch>,
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) info: VmInfo,
    pub(crate) devices: DeviceHandles,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// What was built.
    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    /// The watch on the guest console (to wait for a line).
    pub fn console_watch(&self) -> Arc<ConsoleWatch> {
        self.watch.clone()
    }

    /// Starts the event loop and the vCPUs. If a vCPU thread cannot start, the VM is
    /// stopped and its threads joined before the error returns.
    pub fn start(self) -> Result<RunningVm, BuildError> {
        let events = self.events.spawn(self.exit.clone())?;
        let mut running = RunningVm {
            vm: self.vm,
            mem: self.mem,
            threads: Vec::with_capacity(self.vcpus.len()),
            events: Some(events),
            exit: self.exit,
            watch: self.watch,
            control: self.control,
            devices: self.devices,
            info: self.info,
        };
        for v in self.vcpus {
            match v.spawn() {
                Ok(t) => running.threads.push(t),
                Err(e) => {
                    running.handle().stop();
                    running.wait();
                    return Err(BuildError::Io(e));
                }
            }
        }
        Ok(running)
    }
}

/// Controls a running VM from any thread.
#[derive(Clone, Debug)]
pub struct VmHandle {
    exit: Arc<ExitNotifier>,
    control: Arc<VcpuControl>,
}

impl VmHandle {
    /// Ends the VM ([`VmExit::Stopped`] unless it already ended otherwise).
    pub fn stop(&self) {
        self.exit.report(VmExit::Stopped);
    }

    /// Stops all vCPUs (the guest's clock keeps running). Returns when they are parked.
    pub fn pause(&self) {
        self.control.pause();
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.control.set(RunState::Running);
    }

    /// Waits up to `timeout` (forever with None) for the VM to end; returns the raw reason.
    pub fn wait_ended(&self, timeout: Option<Duration>) -> Option<VmExit> {
        self.exit.wait_timeout(timeout)
    }
}

/// A running VM.
#[derive(Debug)]
pub struct RunningVm {
    vm: Vm,
    mem: GuestMemory,
    threads: Vec<VcpuThread>,
    events: Option<EventLoopThread>,
    exit: Arc<ExitNotifier>,
    watch: Arc<ConsoleWatch>,
    control: Arc<VcpuControl>,
    devices: DeviceHandles,
    info: VmInfo,
}

impl RunningVm {
    /// A handle to stop, pause or resume the VM.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            exit: self.exit.clone(),
            control: self.control.clone(),
        }
    }

    /// Whether the VM has ended (or is ending), waiting up to `timeout` for it.
    pub fn ended_within(&self, timeout: Duration) -> bool {
        self.exit.wait_timeout(Some(timeout)).is_some()
    }

    /// A descriptor that becomes readable when the VM ends (for `poll` with other fds).
    pub fn exit_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&*self.exit)
    }

    /// Saves the VM, as a VM of `shape`, into `dir` (an empty directory): it pauses the
    /// vCPUs, which stay paused afterwards (resume or stop it then). While the state is
    /// read and memory is written, every virtio device is held, so no device moves its
    /// queues or writes guest memory in between.
    pub fn snapshot(&self, dir: &Path, shape: &Shape) -> Result<(), SnapshotError> {
        if self.exit.peek().is_some() {
            return Err(SnapshotError::VmEnded);
        }
        let vcpus = self.control.save_states(self.threads.len(), SAVE_TIMEOUT)?;
        let kvm = VmKvmState::save(self.vm.fd())?;
        let transports: Vec<_> = self.devices.transports.iter().map(|t| lock(t)).collect();
        let models: Vec<_> = transports.iter().map(|t| t.device()).collect();
        let held: Vec<MutexGuard<'_, dyn VirtioDevice>> = models.iter().map(|d| lock(d)).collect();
        let virtio = transports
            .iter()
            .zip(&held)
            .map(|(t, d)| t.save_state(&**d))
            .collect();
        let state = VmState {
            shape: shape.clone(),
            memory_id: String::new(),
            regions: Vec::new(),
            cmdline: self.info.cmdline.clone(),
            kvm,
            vcpus,
            serial: lock(&self.devices.serial).state(),
            virtio,
        };
        snapshot::save(dir, state, &self.mem)
    }

    /// Waits until the VM ends, stops every thread and returns why it ended.
    pub fn wait(mut self) -> VmExit {
        let raw = self.exit.wait();
        // Every vCPU sees Stopping at its next check; the kick that comes with it makes
        // one in KVM_RUN (or about to enter it) return at once.
        self.control.set(RunState::Stopping);
        for t in std::mem::take(&mut self.threads) {
            t.join();
        }
        if let Some(events) = self.events.take() {
            events.stop();
        }
        classify(raw, &self.watch)
    }
}

/// Refines a raw exit with what the console showed: a reset after a power-off message is
/// a power-off; a reset or triple fault after a panic line is a panic.
fn classify(raw: VmExit, watch: &ConsoleWatch) -> VmExit {
    match raw {
        VmExit::Reset | VmExit::TripleFault { .. } | VmExit::Panic { .. }
            if watch.powered_off() =>
        {
            VmExit::PowerOff
        }
        VmExit::Reset | VmExit::TripleFault { .. } => match watch.panic_message() {
            Some(message) => VmExit::Panic { message },
            None => raw,
        },
        other => other,
    }
}
