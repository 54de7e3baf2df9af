//! Why a VM ended, and the one-shot notifier that vCPU threads and devices use to report
//! it to the thread that owns the VM.

use std::fmt;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// The reason a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself (i8042 reset line or a KVM reset event): how a runvm guest ends.
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The host asked the VM to stop.
    Stopped,
    /// The guest kernel panicked; `message` is its panic line.
    Panic { message: String },
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8 },
    /// KVM could not execute a guest instruction (KVM_EXIT_INTERNAL_ERROR).
    InternalError {
        vcpu: u8,
        suberror: u32,
        rip: u64,
        bytes: Vec<u8>,
    },
    /// KVM refused to enter the guest (KVM_EXIT_FAIL_ENTRY).
    FailEntry { vcpu: u8, reason: u64 },
    /// A vCPU thread failed outside the guest (an ioctl error, a device that panicked).
    VcpuError { vcpu: u8, message: String },
    /// The device I/O thread failed: the devices would stop answering, so the VM ends.
    DeviceError { message: String },
}

impl VmExit {
    /// Whether the guest ended the way a healthy guest does.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::PowerOff | VmExit::Stopped)
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset"),
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Stopped => write!(f, "VM stopped by the host"),
            VmExit::Panic { message } => write!(f, "guest kernel panic: {message}"),
            VmExit::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted"),
            VmExit::InternalError {
                vcpu,
                suberror,
                rip,
                bytes,
            } => {
                write!(
                    f,
                    "KVM internal error on vCPU {vcpu} (suberror {suberror}{}) at RIP {rip:#x}, instruction bytes:",
                    if *suberror == 1 { ": emulation failure" } else { "" }
                )?;
                if bytes.is_empty() {
                    write!(f, " unreadable")?;
                }
                for b in bytes {
                    write!(f, " {b:02x}")?;
                }
                Ok(())
            }
            VmExit::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "KVM could not enter vCPU {vcpu} (hardware reason {reason:#x})"
                )
            }
            VmExit::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
            VmExit::DeviceError { message } => write!(f, "device thread failed: {message}"),
        }
    }
}

/// Collects the first exit reason reported and wakes the owner through an eventfd.
#[derive(Debug)]
pub struct ExitNotifier {
    reason: Mutex<Option<VmExit>>,
    evt: EventFd,
}

impl ExitNotifier {
    /// A notifier with nothing reported yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitNotifier {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `exit` unless another reason came first, and wakes the owner.
    pub fn report(&self, exit: VmExit) {
        let mut reason = crate::bus::lock(&self.reason);
        if reason.is_none() {
            log::debug!("VM exit reported: {exit}");
            *reason = Some(exit);
        }
        // A full eventfd counter still wakes the reader.
        let _ = self.evt.write(1);
    }

    /// The reason reported so far, if any.
    pub fn peek(&self) -> Option<VmExit> {
        crate::bus::lock(&self.reason).clone()
    }

    /// The eventfd that becomes readable once a reason is reported.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Blocks until a reason is reported and returns it.
    pub fn wait(&self) -> VmExit {
        loop {
            if let Some(exit) = self.wait_timeout(None) {
                return exit;
            }
        }
    }

    /// Blocks until a reason is reported or `timeout` passes.
    pub fn wait_timeout(&self, timeout: Option<std::time::Duration>) -> Option<VmExit> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(exit) = self.peek() {
                return Some(exit);
            }
            let timeout = match deadline {
                None => nix::poll::PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    nix::poll::PollTimeout::try_from(left).unwrap_or(nix::poll::PollTimeout::MAX)
                }
            };
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(self),
                nix::poll::PollFlags::POLLIN,
            )];
            // EINTR and the like: the loop checks again.
            let _ = nix::poll::poll(&mut fds, timeout);
        }
    }
}

impl std::os::fd::AsFd for ExitNotifier {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the eventfd stays open as long as the notifier that owns it.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&self.evt)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_report_wins_and_wakes_waiter() {
        let n = Arc::new(ExitNotifier::new().unwrap());
        let n2 = n.clone();
        let t = std::thread::spawn(move || n2.wait());
        std::thread::sleep(std::time::Duration::from_millis(20));
        n.report(VmExit::TripleFault { vcpu: 1 });
        n.report(VmExit::Reset);
        assert_eq!(t.join().unwrap(), VmExit::TripleFault { vcpu: 1 });
        assert_eq!(n.peek(), Some(VmExit::TripleFault { vcpu: 1 }));
    }

    #[test]
    fn messages_are_one_line_with_context() {
        let e = VmExit::InternalError {
            vcpu: 0,
            suberror: 1,
            rip: 0xffffffff81000000,
            bytes: vec![0x0f, 0xae, 0x2f],
        };
        let s = e.to_string();
        assert!(!s.contains('\n'));
        assert!(s.contains("0xffffffff81000000"), "{s}");
        assert!(s.contains("0f ae 2f"), "{s}");
        assert!(s.contains("emulation failure"), "{s}");
        assert!(!e.is_clean());
        assert!(VmExit::Reset.is_clean());
    }
}
