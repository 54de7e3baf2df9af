//! The one ordered path from a `VmConfig` to a running VM: validate, KVM VM, guest memory,
//! irqchip, event loop, legacy devices, virtio devices, kernel and boot data, vCPUs. Then
//! `Vmm::start` runs it and `RunningVm::wait` returns why it ended.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;

use crate::boot::{self, regs, BootError, EntryMode};
use crate::bus::{Bus, BusError};
use crate::cmdline::{self, CmdlineError, MmioDeviceArg};
use crate::config::{ConfigError, ConsoleOutput, VmConfig};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{
    ConsoleSink, ConsoleWatch, SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN,
};
use crate::devices::virtio::mmio::{MmioError, MmioTransport};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::IrqLine;
use crate::event_loop::{EventLoop, EventLoopError, EventLoopThread, Subscriber};
use crate::exit::{ExitNotifier, VmExit};
use crate::host_profile::HostProfile;
use crate::memory::{self, layout, GuestMemory};
use crate::vcpu::{self, RunState, Vcpu, VcpuControl, VcpuThread};
use crate::vm::{Vm, VmError};

/// Errors while building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("allocating {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Mmio(#[from] MmioError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error("opening console log {path}: {source}")]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("too many virtio devices: at most {max}")]
    TooManyDevices { max: usize },
    #[error("setting up vCPU: {0}")]
    Vcpu(#[from] regs::RegsError),
    #[error("creating an eventfd or thread: {0}")]
    Io(#[from] std::io::Error),
}

struct PendingDevice {
    device: Arc<Mutex<dyn VirtioDevice>>,
    subscriber: Subscriber,
}

/// Collects what goes into a VM, then builds it in order.
pub struct VmBuilder {
    config: VmConfig,
    profile: HostProfile,
    devices: Vec<PendingDevice>,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("config", &self.config)
            .field("devices", &self.devices.len())
            .finish()
    }
}

/// What was built, for logs and callers.
#[derive(Clone, Debug)]
pub struct VmInfo {
    pub vcpus: u8,
    pub mem_mib: u64,
    pub cmdline: String,
    pub entry: EntryMode,
}

/// A built VM, not yet running.
pub struct Vmm {
    vm: Vm,
    mem: GuestMemory,
    vcpus: Vec<Vcpu>,
    events: EventLoop,
    exit: Arc<ExitNotifier>,
    watch: Arc<ConsoleWatch>,
    control: Arc<VcpuControl>,
    info: VmInfo,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl VmBuilder {
    /// A builder for `config` on a host with `profile`.
    pub fn new(config: VmConfig, profile: HostProfile) -> Self {
        VmBuilder {
            config,
            profile,
            devices: Vec::new(),
        }
    }

    /// Adds a virtio device; it gets the next MMIO window and interrupt line, and joins the
    /// event loop as a subscriber.
    pub fn add_virtio_device<D>(&mut self, device: Arc<Mutex<D>>)
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        self.devices.push(PendingDevice {
            device: device.clone(),
            subscriber: device,
        });
    }

    fn console_sink(&self, watch: Arc<ConsoleWatch>) -> Result<ConsoleSink, BuildError> {
        let out: Option<Box<dyn Write + Send>> = match &self.config.console {
            ConsoleOutput::Sink => None,
            ConsoleOutput::Stdout => Some(Box::new(std::io::stdout())),
            ConsoleOutput::File(path) => Some(Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| BuildError::Console {
                        path: path.clone(),
                        source,
                    })?,
            )),
        };
        Ok(ConsoleSink::new(out, watch))
    }

    /// Builds the VM: every step in order; nothing runs yet.
    pub fn build(self) -> Result<Vmm, BuildError> {
        self.config.validate()?;
        boot::check_kernel_format(&self.config.kernel)?;
        let vcpu_count = self.profile.vcpus(self.config.vcpus);
        if vcpu_count != self.config.vcpus {
            log::debug!(
                "host profile: {}; {} vCPUs requested, {vcpu_count} used",
                self.profile.describe(),
                self.config.vcpus
            );
        }
        let max_devices = (layout::IRQ_MAX - layout::IRQ_BASE + 1) as usize;
        if self.devices.len() > max_devices {
            return Err(BuildError::TooManyDevices { max: max_devices });
        }

        // 1. VM and memory.
        let vm = Vm::new()?;
        let mem_bytes = self.config.mem_mib << 20;
        let mem = memory::create_guest_memory(mem_bytes).map_err(|e| BuildError::Memory {
            mib: self.config.mem_mib,
            reason: e.to_string(),
        })?;
        vm.register_memory(&mem)?;

        // 2. Interrupt controllers and PIT.
        vm.setup_irqchip()?;

        // 3. Event loop and exit notification.
        let exit = Arc::new(ExitNotifier::new()?);
        let mut events = EventLoop::new()?;

        // 4. Legacy devices on the port I/O bus.
        let watch = Arc::new(ConsoleWatch::default());
        let mut pio = Bus::new();
        let com1_irq = IrqLine::new(COM1_IRQ)?;
        vm.register_irq(&com1_irq)?;
        let serial = SerialDevice::new(com1_irq, self.console_sink(watch.clone())?);
        pio.insert(Arc::new(Mutex::new(serial)), COM1_BASE, COM1_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_BASE,
            I8042_LEN,
        )?;

        // 5. virtio-mmio devices.
        let mut mmio = Bus::new();
        let mut device_args = Vec::new();
        for (i, d) in self.devices.into_iter().enumerate() {
            let base = layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE;
            let line = IrqLine::new(layout::IRQ_BASE + i as u32)?;
            vm.register_irq(&line)?;
            let interrupt = Arc::new(VirtioInterrupt::new(line));
            let transport = MmioTransport::new(d.device, mem.clone(), interrupt)?;
            for (q, evt) in transport.queue_notify_eventfds().iter().enumerate() {
                let notify =
                    base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY);
                vm.register_mmio_notify(evt, notify, q as u32)?;
            }
            mmio.insert(
                Arc::new(Mutex::new(transport)),
                base,
                layout::VIRTIO_MMIO_SIZE,
            )?;
            events.add(d.subscriber);
            device_args.push(MmioDeviceArg {
                base,
                size: layout::VIRTIO_MMIO_SIZE,
                irq: layout::IRQ_BASE + i as u32,
            });
        }

        // 6. Kernel, initramfs, command line, boot parameters, MP table.
        let kernel = boot::load_kernel(&mem, &self.config.kernel)?;
        let initrd = match &self.config.initrd {
            Some(path) => Some(boot::load_initrd(&mem, path, kernel.end)?),
            None => None,
        };
        let cmdline = cmdline::build(&self.profile, &device_args, &self.config.cmdline)?;
        boot::write_boot_data(&mem, &kernel, &cmdline, initrd.as_ref(), vcpu_count)?;

        // 7. vCPUs.
        vcpu::install_kick_handler()?;
        let cpuid = vm.supported_cpuid()?;
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let control = Arc::new(VcpuControl::new());
        let mut vcpus = Vec::with_capacity(vcpu_count.into());
        for index in 0..vcpu_count {
            let fd = vm.create_vcpu(index)?;
            let mut cpuid = cpuid.clone();
            regs::patch_cpuid(&mut cpuid, index, vcpu_count);
            regs::configure_vcpu(&fd, index, &mem, kernel.mode, kernel.entry.0, &cpuid)?;
            vcpus.push(Vcpu::new(
                index,
                fd,
                pio.clone(),
                mmio.clone(),
                exit.clone(),
                mem.clone(),
                control.clone(),
            ));
        }

        let info = VmInfo {
            vcpus: vcpu_count,
            mem_mib: self.config.mem_mib,
            cmdline: cmdline
                .as_cstring()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default(),
            entry: kernel.mode,
        };
        log::debug!("VM built: {info:?}");
        Ok(Vmm {
            vm,
            mem,
            vcpus,
            events,
            exit,
            watch,
            control,
            info,
        })
    }
}

impl Vmm {
    /// What was built.
    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    /// Starts the event loop and the vCPUs.
    pub fn start(self) -> Result<RunningVm, BuildError> {
        let events = self.events.spawn()?;
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for v in self.vcpus {
            match v.spawn() {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let running = RunningVm {
                        _vm: self.vm,
                        _mem: self.mem,
                        threads,
                        events: Some(events),
                        exit: self.exit,
                        watch: self.watch,
                        control: self.control,
                    };
                    running.handle().stop();
                    running.wait();
                    return Err(BuildError::Io(e));
                }
            }
        }
        Ok(RunningVm {
            _vm: self.vm,
            _mem: self.mem,
            threads,
            events: Some(events),
            exit: self.exit,
            watch: self.watch,
            control: self.control,
        })
    }
}

/// Controls a running VM from any thread.
#[derive(Clone, Debug)]
pub struct VmHandle {
    exit: Arc<ExitNotifier>,
    control: Arc<VcpuControl>,
    vcpus: usize,
}

impl VmHandle {
    /// Ends the VM ([`VmExit::Stopped`] unless it already ended otherwise).
    pub fn stop(&self) {
        self.exit.report(VmExit::Stopped);
    }

    /// Stops all vCPUs (the guest's clock keeps running). Returns when they are parked.
    pub fn pause(&self) {
        self.control.pause(self.vcpus);
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.control.set(RunState::Running);
    }

    /// Waits up to `timeout` (forever with None) for the VM to end; returns the raw reason.
    pub fn wait_ended(&self, timeout: Option<std::time::Duration>) -> Option<VmExit> {
        self.exit.wait_timeout(timeout)
    }
}

/// A running VM.
#[derive(Debug)]
pub struct RunningVm {
    _vm: Vm,
    _mem: GuestMemory,
    threads: Vec<VcpuThread>,
    events: Option<EventLoopThread>,
    exit: Arc<ExitNotifier>,
    watch: Arc<ConsoleWatch>,
    control: Arc<VcpuControl>,
}

impl RunningVm {
    /// A handle to stop, pause or resume the VM.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            exit: self.exit.clone(),
            control: self.control.clone(),
            vcpus: self.threads.len(),
        }
    }

    /// Whether the VM has ended (or is ending), waiting up to `timeout` for it.
    pub fn ended_within(&self, timeout: std::time::Duration) -> bool {
        self.exit.wait_timeout(Some(timeout)).is_some()
    }

    /// A descriptor that becomes readable when the VM ends (for `poll` with other fds).
    pub fn exit_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self.exit.eventfd())
    }

    /// Waits until the VM ends, stops every thread and returns why it ended.
    pub fn wait(mut self) -> VmExit {
        let raw = self.exit.wait();
        self.control.set(RunState::Stopping);
        let threads = std::mem::take(&mut self.threads);
        while threads.iter().any(|t| !t.is_finished()) {
            self.control.kick_all();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for t in threads {
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
