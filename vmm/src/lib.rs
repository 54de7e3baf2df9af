//! runvm's virtual machine monitor: boots a Linux guest in a KVM micro-VM with an 8250
//! console, an i8042 reset line and virtio-mmio devices, and reports why it ended.
//!
//! Data flow: [`VmConfig`] -> [`VmBuilder`] (memory, irqchip, devices, kernel, vCPUs) ->
//! [`Vmm::start`] -> [`RunningVm::wait`] -> [`VmExit`].

pub mod boot;
pub mod builder;
pub mod bus;
pub mod cmdline;
pub mod config;
pub mod console_log;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod fuzzing;
pub mod host_profile;
pub mod memory;
pub mod running;
pub mod seccomp;
pub mod snapshot;
pub mod unix_path;
pub mod vcpu;
pub mod vm;

pub use builder::{BuildError, MmioAllocator, VmBuilder, VmInfo};
pub use config::{ConsoleOutput, VmConfig};
pub use exit::VmExit;
pub use host_profile::{HostKind, HostProfile};
pub use running::{RunningVm, VmHandle, Vmm};
