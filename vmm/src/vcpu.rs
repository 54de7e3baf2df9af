//! vCPU threads. Each runs `KVM_RUN` in a loop and routes exits through the port I/O and
//! MMIO buses; exits that end the VM go to the exit notifier. A shared `VcpuControl` moves
//! all vCPUs between running, paused and stopping.
//!
//! Kicking a vCPU: a real-time signal whose handler sets `immediate_exit` in the thread's
//! own `kvm_run`. A vCPU inside `KVM_RUN` returns at once (EINTR); one that is between its
//! state check and `KVM_RUN` enters it with `immediate_exit` set and returns at once too,
//! so one kick always suffices: no re-kick timer, no spinning.
//!
//! Saving state (for a snapshot): while the vCPUs are paused, `VcpuControl::save_states`
//! asks each parked thread for its state; the thread first re-enters `KVM_RUN` with
//! `immediate_exit` set, which completes an I/O exit it had handled (KVM finishes the
//! instruction) without running the guest, then reads its state through KVM.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use nix::sys::pthread::{pthread_self, Pthread};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::bus::{lock, Bus};
use crate::event_loop::panic_message;
use crate::exit::{ExitNotifier, VmExit};
use crate::memory::GuestMemory;
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{VcpuSaveError, VcpuState};
use seccompiler::BpfProgram;

/// Offset from SIGRTMIN of the signal that interrupts `KVM_RUN`.
const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// This thread's `kvm_run` (null on threads that are not vCPUs).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// What the vCPUs should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Shared run state of all vCPUs of a VM: the requested state, how many vCPUs are parked,
/// and the threads to kick out of `KVM_RUN` when the state changes.
#[derive(Debug)]
pub struct VcpuControl {
    inner: Mutex<ControlInner>,
    changed: Condvar,
}

#[derive(Debug)]
struct ControlInner {
    state: RunState,
    parked: usize,
    threads: Vec<Pthread>,
    /// Saved states by vCPU index while a save is asked for (see `save_states`).
    save: Option<Vec<Option<Result<VcpuState, VcpuSaveError>>>>,
    /// Counts save requests: a state saved for one that timed out is not handed to the next.
    save_round: u64,
}

impl VcpuControl {
    /// Control in the running state.
    pub fn new() -> Self {
        VcpuControl {
            inner: Mutex::new(ControlInner {
                state: RunState::Running,
                parked: 0,
                threads: Vec::new(),
                save: None,
                save_round: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// The requested state.
    pub fn state(&self) -> RunState {
        lock(&self.inner).state
    }

    /// Requests `state` (stopping is final) and kicks every vCPU so it notices.
    pub fn set(&self, state: RunState) {
        let mut s = lock(&self.inner);
        if s.state != RunState::Stopping {
            s.state = state;
        }
        Self::kick(&s);
        self.changed.notify_all();
    }

    /// Requests a pause and waits until every running vCPU is parked (or the VM stops).
    pub fn pause(&self) {
        self.set(RunState::Paused);
        let mut s = lock(&self.inner);
        while s.parked < s.threads.len() && s.state == RunState::Paused {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Pauses the vCPUs and has each of the `count` of them save its state; returns the
    /// states in vCPU order, or why they could not be saved within `timeout` (a vCPU that
    /// ended or did not park, an ioctl that failed). The vCPUs stay paused.
    pub fn save_states(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, VcpuSaveError> {
        let deadline = Instant::now() + timeout;
        self.set(RunState::Paused);
        let mut s = lock(&self.inner);
        let parked = |s: &ControlInner| s.parked >= s.threads.len();
        s = self.wait_until(s, deadline, parked);
        if s.state != RunState::Paused || s.threads.len() != count || !parked(&s) {
            return Err(VcpuSaveError::NotParked(timeout));
        }
        s.save = Some((0..count).map(|_| None).collect());
        s.save_round += 1;
        self.changed.notify_all();
        let saved = |s: &ControlInner| {
            s.save
                .as_ref()
                .is_some_and(|v| v.iter().all(Option::is_some))
                || s.threads.len() != count
        };
        s = self.wait_until(s, deadline, saved);
        let results = s.save.take().unwrap_or_default();
        results
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or(Err(VcpuSaveError::NoAnswer(i))))
            .collect()
    }

    /// Waits until `done` holds, the state leaves Paused, or `deadline` passes.
    fn wait_until<'a>(
        &self,
        mut s: std::sync::MutexGuard<'a, ControlInner>,
        deadline: Instant,
        done: impl Fn(&ControlInner) -> bool,
    ) -> std::sync::MutexGuard<'a, ControlInner> {
        while !done(&s) && s.state == RunState::Paused {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        s
    }

    fn kick(s: &ControlInner) {
        let kick = SIGRTMIN() + KICK_SIGNAL_OFFSET;
        for &t in &s.threads {
            // Threads deregister under this lock before they exit, so `t` names a live
            // thread; the handler only sets that thread's immediate_exit.
            // SAFETY: pthread_kill with a real-time signal number nix has no name for.
            let r = unsafe { libc::pthread_kill(t, kick) };
            if r != 0 {
                log::debug!("kicking vCPU thread: error {r}");
            }
        }
    }

    fn register_current(&self) {
        lock(&self.inner).threads.push(pthread_self());
    }

    fn unregister_current(&self) {
        let me = pthread_self();
        let mut s = lock(&self.inner);
        s.threads.retain(|t| *t != me);
        // A pause waiting for this vCPU to park must not wait for it any more.
        self.changed.notify_all();
    }

    /// Called by vCPU `index` between runs: parks while paused, saving its state with
    /// `save` when asked to; returns false to stop.
    fn checkpoint(
        &self,
        index: u8,
        mut save: impl FnMut() -> Result<VcpuState, VcpuSaveError>,
    ) -> bool {
        let mut s = lock(&self.inner);
        if s.state == RunState::Paused {
            s.parked += 1;
            self.changed.notify_all();
            while s.state == RunState::Paused {
                let asked = s
                    .save
                    .as_ref()
                    .and_then(|v| v.get(usize::from(index)))
                    .is_some_and(Option::is_none);
                if asked {
                    // Saving (ioctls, a pending I/O exit completed) runs without the lock,
                    // so the caller's deadline holds however long it takes.
                    let round = s.save_round;
                    drop(s);
                    let state = save();
                    s = lock(&self.inner);
                    let current = s.save_round == round;
                    let slot = s.save.as_mut().and_then(|v| v.get_mut(usize::from(index)));
                    if let (Some(slot), true) = (slot, current) {
                        *slot = Some(state);
                    }
                    self.changed.notify_all();
                    continue;
                }
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.parked -= 1;
        }
        s.state != RunState::Stopping
    }
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self::new()
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: a vCPU thread stores its own mapped kvm_run here before it can be kicked
        // and clears it before the mapping goes away; this handler runs on that thread.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the handler of the kick signal, once per process. Without SA_RESTART, a signal
/// delivered during `KVM_RUN` makes it return EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// A vCPU ready to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitNotifier>,
    mem: GuestMemory,
    control: Arc<VcpuControl>,
    filter: Option<Arc<BpfProgram>>,
    /// The MSRs KVM lists, for saving state.
    msr_list: Arc<[u32]>,
}

/// What one `KVM_RUN` came to.
enum RunOutcome {
    /// An exit was handled; run again.
    Handled,
    /// A kick interrupted it (or `immediate_exit` was set): nothing ran.
    Interrupted,
    /// The VM ends.
    Ended(VmExit),
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    index: u8,
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the thread.
    pub fn join(self) {
        if self.handle.join().is_err() {
            log::error!("vCPU {} thread panicked", self.index);
        }
    }
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(
        index: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitNotifier>,
        mem: GuestMemory,
        control: Arc<VcpuControl>,
    ) -> Self {
        Vcpu {
            index,
            fd,
            pio,
            mmio,
            exit,
            mem,
            control,
            filter: None,
            msr_list: Arc::from(Vec::new()),
        }
    }

    /// Puts a new vCPU into a saved state (before its thread starts).
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), crate::snapshot::SnapshotError> {
        state.restore(&self.fd)
    }

    /// The MSRs to save in a snapshot (KVM's index list).
    pub fn set_msr_list(&mut self, list: Arc<[u32]>) {
        self.msr_list = list;
    }

    /// Completes an I/O exit already handled (KVM finishes the instruction when it is
    /// entered again; `immediate_exit` keeps the guest from running), then reads the
    /// vCPU's state.
    fn save_state(&mut self) -> Result<VcpuState, VcpuSaveError> {
        loop {
            self.fd.set_kvm_immediate_exit(1);
            match self.run_once() {
                RunOutcome::Interrupted => break,
                RunOutcome::Handled => continue,
                RunOutcome::Ended(exit) => {
                    self.fd.set_kvm_immediate_exit(0);
                    let why = VcpuSaveError::VmEnded {
                        vcpu: self.index,
                        exit: exit.to_string(),
                    };
                    self.exit.report(exit);
                    return Err(why);
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        VcpuState::save(&self.fd, self.index, &self.msr_list).map_err(|source| {
            VcpuSaveError::Read {
                vcpu: self.index,
                source: Box::new(source),
            }
        })
    }

    /// The seccomp filter its thread installs before it first enters the guest.
    pub fn set_filter(&mut self, filter: Option<Arc<BpfProgram>>) {
        self.filter = filter;
    }

    /// Starts the vCPU on its own thread.
    pub fn spawn(self) -> std::io::Result<VcpuThread> {
        let index = self.index;
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run())?;
        Ok(VcpuThread { index, handle })
    }

    fn run(mut self) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run));
        if let Some(bpf) = self.filter.take() {
            if let Err(e) = seccomp::install_compiled(ThreadKind::Vcpu, &bpf) {
                self.exit.report(VmExit::VcpuError {
                    vcpu: self.index,
                    message: e.to_string(),
                });
                return;
            }
        }
        self.control.register_current();
        let control = self.control.clone();
        let save = |v: &mut Self| {
            // A device model that panics while a pending exit completes ends the VM.
            std::panic::catch_unwind(AssertUnwindSafe(|| v.save_state())).unwrap_or_else(|p| {
                let message = format!("a device panicked: {}", panic_message(&*p));
                v.exit.report(VmExit::VcpuError {
                    vcpu: v.index,
                    message: message.clone(),
                });
                Err(VcpuSaveError::Panicked {
                    vcpu: v.index,
                    message,
                })
            })
        };
        while control.checkpoint(self.index, || save(&mut self)) {
            // A device model that panics on this thread must end the VM, not only the vCPU.
            let exit = match std::panic::catch_unwind(AssertUnwindSafe(|| self.run_once())) {
                Ok(RunOutcome::Handled | RunOutcome::Interrupted) => continue,
                Ok(RunOutcome::Ended(exit)) => exit,
                Err(panic) => VmExit::VcpuError {
                    vcpu: self.index,
                    message: format!("a device panicked: {}", panic_message(&*panic)),
                },
            };
            self.exit.report(exit);
            break;
        }
        self.control.unregister_current();
        // No kick reaches this thread any more (it is unregistered).
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }

    /// One `KVM_RUN` and the exit it came to.
    fn run_once(&mut self) -> RunOutcome {
        let index = self.index;
        let ended = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if !self.pio.read(port.into(), data) {
                        data.fill(0xff);
                    }
                    None
                }
                VcpuExit::IoOut(port, data) => {
                    if !self.pio.write(port.into(), data) {
                        log::trace!("vcpu{index}: unhandled out {port:#x}");
                    }
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio.read(addr, data) {
                        log::debug!("vcpu{index}: unhandled MMIO read at {addr:#x}");
                        data.fill(0xff);
                    }
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !self.mmio.write(addr, data) {
                        log::debug!("vcpu{index}: unhandled MMIO write at {addr:#x}");
                    }
                    None
                }
                VcpuExit::Shutdown => Some(VmExit::TripleFault { vcpu: index }),
                VcpuExit::SystemEvent(kind, _) => Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => VmExit::Panic {
                        message: "crash event from KVM".into(),
                    },
                    other => VmExit::VcpuError {
                        vcpu: index,
                        message: format!("unknown system event {other}"),
                    },
                }),
                VcpuExit::Hlt => {
                    // With the in-kernel LAPIC, KVM handles HLT itself; a HLT exit means the
                    // guest stopped its CPU for good.
                    Some(VmExit::PowerOff)
                }
                VcpuExit::InternalError => Some(self.internal_error()),
                VcpuExit::FailEntry(reason, _) => Some(VmExit::FailEntry {
                    vcpu: index,
                    reason,
                }),
                VcpuExit::Intr => None,
                other => {
                    log::warn!("vcpu{index}: unexpected exit {other:?}");
                    None
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: take it, then the caller checks the requested state.
                self.fd.set_kvm_immediate_exit(0);
                return RunOutcome::Interrupted;
            }
            Err(e) => Some(VmExit::VcpuError {
                vcpu: index,
                message: format!("KVM_RUN: {e}"),
            }),
        };
        match ended {
            Some(exit) => RunOutcome::Ended(exit),
            None => RunOutcome::Handled,
        }
    }

    /// Describes an emulation failure: where, and the bytes KVM could not execute.
    fn internal_error(&mut self) -> VmExit {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // member of the kvm_run exit union.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let mut bytes = Vec::new();
        if let Ok(t) = self.fd.translate_gva(rip) {
            if t.valid != 0 {
                let mut buf = [0u8; 15];
                if self
                    .mem
                    .read_slice(&mut buf, GuestAddress(t.physical_address))
                    .is_ok()
                {
                    bytes = buf.to_vec();
                }
            }
        }
        VmExit::InternalError {
            vcpu: self.index,
            suberror,
            rip,
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_save_that_a_vcpu_never_answers_ends_at_its_deadline() {
        install_kick_handler().unwrap();
        let c = Arc::new(VcpuControl::new());
        let c2 = c.clone();
        let (registered_tx, registered) = std::sync::mpsc::channel();
        let (stop_tx, stop) = std::sync::mpsc::channel::<()>();
        // A stand-in vCPU that never reaches its checkpoint (stuck in a device, say).
        let t = std::thread::spawn(move || {
            c2.register_current();
            registered_tx.send(()).unwrap();
            let _ = stop.recv();
            c2.unregister_current();
        });
        registered.recv().unwrap();
        let started = Instant::now();
        let e = c.save_states(1, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, VcpuSaveError::NotParked(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        stop_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_save_that_outlasts_its_deadline_does_not_hold_the_caller() {
        install_kick_handler().unwrap();
        let c = Arc::new(VcpuControl::new());
        let c2 = c.clone();
        let (registered_tx, registered) = std::sync::mpsc::channel();
        // A stand-in vCPU that parks, then takes 3 s to save its state.
        let t = std::thread::spawn(move || {
            c2.register_current();
            registered_tx.send(()).unwrap();
            while c2.state() == RunState::Running {
                std::thread::yield_now();
            }
            let go_on = c2.checkpoint(0, || {
                std::thread::sleep(Duration::from_secs(3));
                Err(VcpuSaveError::NoAnswer(0))
            });
            c2.unregister_current();
            go_on
        });
        registered.recv().unwrap();
        let started = Instant::now();
        let e = c.save_states(1, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, VcpuSaveError::NoAnswer(0)), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "returned after {:?}",
            started.elapsed()
        );
        c.set(RunState::Stopping);
        assert!(!t.join().unwrap());
    }

    #[test]
    fn pause_parks_and_resume_releases() {
        install_kick_handler().unwrap();
        let c = Arc::new(VcpuControl::new());
        let (c2, c3) = (c.clone(), c.clone());
        let (registered_tx, registered) = std::sync::mpsc::channel();
        // A stand-in vCPU: registered (it gets kicks), parks at its checkpoint.
        let t = std::thread::spawn(move || {
            c2.register_current();
            registered_tx.send(()).unwrap();
            while c2.state() == RunState::Running {
                std::thread::yield_now();
            }
            let go_on = c2.checkpoint(0, || Err(VcpuSaveError::NoAnswer(0)));
            c2.unregister_current();
            go_on
        });
        registered.recv().unwrap();
        std::thread::spawn(move || c3.pause()).join().unwrap();
        assert_eq!(
            lock(&c.inner).parked,
            1,
            "pause returns once the vCPU parked"
        );
        assert!(!t.is_finished());
        c.set(RunState::Running);
        assert!(t.join().unwrap());
        // With no vCPU left, a pause does not wait.
        c.pause();
        c.set(RunState::Stopping);
        assert!(!c.checkpoint(0, || Err(VcpuSaveError::NoAnswer(0))));
        c.set(RunState::Running);
        assert_eq!(c.state(), RunState::Stopping, "stopping is final");
    }
}
