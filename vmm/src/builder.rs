//! The one ordered path from a `VmConfig` to a VM ready to run, each step a function:
//! validate, KVM VM and guest memory, irqchip, legacy devices, virtio devices (one MMIO
//! window and interrupt line each, from [`MmioAllocator`]), kernel and boot data, vCPUs.
//! Then `Vmm::start` runs it (see `running`).
//!
//! `restore` takes the same path with a snapshot of a VM of the same shape: guest memory
//! is the snapshot's memory file (mapped copy-on-write), no kernel is loaded, and once
//! everything exists the saved state goes back in: KVM's (irqchip, PIT, clock), each
//! vCPU's, then the devices'. Any failure drops the half-built VM: nothing runs.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;

use crate::boot::{self, regs, BootError, EntryMode, LoadedKernel};
use crate::bus::{lock, Bus, BusError};
use crate::cmdline::{self, CmdlineError, MmioDeviceArg};
use crate::config::{ConfigError, ConsoleOutput, VmConfig};
use crate::console_log::{ConsoleLog, CONSOLE_LOG_LIMIT};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{
    ConsoleSink, ConsoleWatch, SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN,
};
use crate::devices::virtio::mmio::{MmioError, MmioTransport};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::IrqLine;
use crate::event_loop::{EventLoop, EventLoopError, Subscriber};
use crate::exit::ExitNotifier;
use crate::host_profile::HostProfile;
use crate::memory::{self, layout, GuestMemory};
use crate::running::Vmm;
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::snapshot::{Snapshot, SnapshotError, VmState};
use crate::vcpu::{self, Vcpu, VcpuControl};
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
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
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
    /// How the kernel was entered (none for a restored VM).
    pub entry: Option<EntryMode>,
}

/// Hands out virtio-mmio windows (4 KiB each from `VIRTIO_MMIO_START`) and interrupt lines
/// (from `IRQ_BASE` to `IRQ_MAX`), one pair per device.
#[derive(Debug, Default)]
pub struct MmioAllocator {
    next: u32,
}

impl MmioAllocator {
    /// Most devices the interrupt lines allow.
    pub const MAX_DEVICES: usize = (layout::IRQ_MAX - layout::IRQ_BASE + 1) as usize;

    /// The next window and line.
    pub fn allocate(&mut self) -> Result<MmioDeviceArg, BuildError> {
        if self.next as usize >= Self::MAX_DEVICES {
            return Err(BuildError::TooManyDevices {
                max: Self::MAX_DEVICES,
            });
        }
        let slot = MmioDeviceArg {
            base: layout::VIRTIO_MMIO_START + u64::from(self.next) * layout::VIRTIO_MMIO_SIZE,
            size: layout::VIRTIO_MMIO_SIZE,
            irq: layout::IRQ_BASE + self.next,
        };
        self.next += 1;
        Ok(slot)
    }
}

/// The legacy devices and the state they report into.
struct Legacy {
    pio: Bus,
    watch: Arc<ConsoleWatch>,
    serial: Arc<Mutex<SerialDevice>>,
}

/// The devices whose state a snapshot keeps, beside their buses.
#[derive(Clone)]
pub(crate) struct DeviceHandles {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl std::fmt::Debug for DeviceHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHandles")
            .field("transports", &self.transports.len())
            .finish()
    }
}

/// Where guest memory and the vCPUs' starting point come from.
enum Origin {
    /// A cold boot of the config's kernel.
    Boot,
    /// A snapshot's memory and state.
    Restore(Box<VmState>),
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

    /// Builds the VM: every step in order; nothing runs yet. A failure leaves nothing behind
    /// (what was created is dropped).
    pub fn build(self) -> Result<Vmm, BuildError> {
        let vcpu_count = self.validate()?;
        let vm = Vm::new()?;
        let mem = guest_memory(&vm, self.config.mem_mib)?;
        self.assemble(vm, mem, vcpu_count, Origin::Boot)
    }

    /// Builds the VM of `snapshot` (taken from a VM of this builder's shape: the caller
    /// loaded it for that shape) with its memory and state; nothing runs yet.
    pub fn restore(self, snapshot: Snapshot) -> Result<Vmm, BuildError> {
        let vcpu_count = self.validate()?;
        let state = snapshot.state;
        let devices: Vec<u32> = self
            .devices
            .iter()
            .map(|d| lock(&d.device).device_type())
            .collect();
        let mib = self.config.mem_mib;
        let fits = state.vcpus.len() == usize::from(vcpu_count)
            && state.regions.iter().map(|r| r.size).sum::<u64>() == mib << 20
            && state
                .virtio
                .iter()
                .map(|m| m.device_type)
                .eq(devices.iter().copied());
        if !fits {
            return Err(
                SnapshotError::invalid(&snapshot.dir, "its VM differs from this one").into(),
            );
        }
        let vm = Vm::new()?;
        let mem = snapshot.memory.map()?;
        vm.register_memory(&mem)?;
        self.assemble(vm, mem, vcpu_count, Origin::Restore(Box::new(state)))
    }

    /// The steps after guest memory, shared by a boot and a restore.
    fn assemble(
        self,
        vm: Vm,
        mem: GuestMemory,
        vcpu_count: u8,
        origin: Origin,
    ) -> Result<Vmm, BuildError> {
        vm.setup_irqchip()?;
        let exit = Arc::new(ExitNotifier::new()?);
        let mut events = EventLoop::new()?;
        let saved = match &origin {
            Origin::Restore(state) => Some(&state.serial),
            Origin::Boot => None,
        };
        let legacy = legacy_devices(&vm, &exit, &self.config.console, saved)?;
        let (mmio, transports, device_args) = virtio_devices(&vm, &mem, &mut events, self.devices)?;
        let control = Arc::new(VcpuControl::new());
        let buses = (Arc::new(legacy.pio), Arc::new(mmio));
        let msr_list: Arc<[u32]> = Arc::from(vm.msr_index_list()?);
        let (mut vcpus, cmdline, mode) = match origin {
            Origin::Boot => {
                let (kernel, cmdline) =
                    load_boot(&mem, &self.config, &self.profile, &device_args, vcpu_count)?;
                let vcpus =
                    create_vcpus(&vm, &mem, Some(&kernel), vcpu_count, buses, &exit, &control)?;
                (vcpus, cmdline, Some(kernel.mode))
            }
            Origin::Restore(state) => {
                let vcpus = create_vcpus(&vm, &mem, None, vcpu_count, buses, &exit, &control)?;
                restore_state(&vm, &vcpus, &transports, &state)?;
                lock(&legacy.serial).reassert_interrupt()?;
                (vcpus, state.cmdline.clone(), None)
            }
        };
        let mode_filter = self.config.seccomp;
        events.set_filter(seccomp::compile(ThreadKind::Devices, mode_filter)?.map(Arc::new));
        let vcpu_filter = seccomp::compile(ThreadKind::Vcpu, mode_filter)?.map(Arc::new);
        for v in &mut vcpus {
            v.set_filter(vcpu_filter.clone());
            v.set_msr_list(msr_list.clone());
        }
        let info = VmInfo {
            vcpus: vcpu_count,
            mem_mib: self.config.mem_mib,
            cmdline,
            entry: mode,
        };
        log::debug!("VM built: {info:?}");
        Ok(Vmm {
            vm,
            mem,
            vcpus,
            events,
            exit,
            watch: legacy.watch,
            control,
            info,
            devices: DeviceHandles {
                serial: legacy.serial,
                transports,
            },
        })
    }

    /// Checks the config and the kernel before anything exists; returns the vCPU count the
    /// host profile allows.
    fn validate(&self) -> Result<u8, BuildError> {
        self.config.validate()?;
        boot::check_kernel_format(&self.config.kernel)?;
        if self.devices.len() > MmioAllocator::MAX_DEVICES {
            return Err(BuildError::TooManyDevices {
                max: MmioAllocator::MAX_DEVICES,
            });
        }
        let vcpus = self.profile.vcpus(self.config.vcpus);
        if vcpus != self.config.vcpus {
            log::debug!(
                "host profile: {}; {} vCPUs requested, {vcpus} used",
                self.profile.describe(),
                self.config.vcpus
            );
        }
        Ok(vcpus)
    }
}

/// Step 1: guest RAM, allocated and registered with KVM.
fn guest_memory(vm: &Vm, mib: u64) -> Result<GuestMemory, BuildError> {
    let mem = memory::create_guest_memory(mib << 20).map_err(|e| BuildError::Memory {
        mib,
        reason: e.to_string(),
    })?;
    vm.register_memory(&mem)?;
    Ok(mem)
}

fn console_sink(
    console: &ConsoleOutput,
    watch: Arc<ConsoleWatch>,
) -> Result<ConsoleSink, BuildError> {
    let out: Option<Box<dyn Write + Send>> = match console {
        ConsoleOutput::Sink => None,
        ConsoleOutput::Stdout => Some(Box::new(std::io::stdout())),
        ConsoleOutput::File(path) => Some(Box::new(
            ConsoleLog::open(path, CONSOLE_LOG_LIMIT).map_err(|source| BuildError::Console {
                path: path.clone(),
                source,
            })?,
        )),
    };
    Ok(ConsoleSink::new(out, watch))
}

/// Step 3: the port I/O bus with the 8250 UART (IRQ 4 through an irqfd) and the i8042,
/// whose reset line ends the VM.
fn legacy_devices(
    vm: &Vm,
    exit: &Arc<ExitNotifier>,
    console: &ConsoleOutput,
    saved: Option<&crate::devices::serial::SerialState>,
) -> Result<Legacy, BuildError> {
    let watch = Arc::new(ConsoleWatch::default());
    let mut pio = Bus::new();
    let com1_irq = IrqLine::new(COM1_IRQ)?;
    vm.register_irq(&com1_irq)?;
    let sink = console_sink(console, watch.clone())?;
    let serial = match saved {
        Some(state) => {
            SerialDevice::from_state(state, com1_irq, sink).map_err(SnapshotError::Serial)?
        }
        None => SerialDevice::new(com1_irq, sink),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
    // The i8042 keeps no state: it only turns the reset command into the VM's end.
    let i8042 = I8042::new(exit.clone());
    pio.insert(Arc::new(Mutex::new(i8042)), I8042_BASE, I8042_LEN)?;
    Ok(Legacy { pio, watch, serial })
}

/// The MMIO bus, its transports and the command-line declarations of their devices.
type VirtioSet = (Bus, Vec<Arc<Mutex<MmioTransport>>>, Vec<MmioDeviceArg>);

/// Step 4: every virtio device behind its MMIO transport, with its interrupt line, its
/// queue-notify ioeventfds and its event-loop subscription. Returns the MMIO bus, the
/// transports and what the kernel command line must declare.
fn virtio_devices(
    vm: &Vm,
    mem: &GuestMemory,
    events: &mut EventLoop,
    devices: Vec<PendingDevice>,
) -> Result<VirtioSet, BuildError> {
    let mut alloc = MmioAllocator::default();
    let mut mmio = Bus::new();
    let mut transports = Vec::with_capacity(devices.len());
    let mut args = Vec::with_capacity(devices.len());
    for d in devices {
        let slot = alloc.allocate()?;
        let line = IrqLine::new(slot.irq)?;
        vm.register_irq(&line)?;
        let interrupt = Arc::new(VirtioInterrupt::new(line));
        let transport = MmioTransport::new(d.device, mem.clone(), interrupt)?;
        let notify = slot.base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY);
        for (q, evt) in transport.queue_notify_eventfds().iter().enumerate() {
            vm.register_mmio_notify(evt, notify, q as u32)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), slot.base, slot.size)?;
        transports.push(transport);
        events.add(d.subscriber);
        args.push(slot);
    }
    Ok((mmio, transports, args))
}

/// Step 5: kernel, initramfs, command line, boot parameters and MP table in guest memory.
/// Returns the loaded kernel and the command line as the guest sees it.
fn load_boot(
    mem: &GuestMemory,
    config: &VmConfig,
    profile: &HostProfile,
    devices: &[MmioDeviceArg],
    vcpus: u8,
) -> Result<(LoadedKernel, String), BuildError> {
    let kernel = boot::load_kernel(mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(mem, path, kernel.end)?),
        None => None,
    };
    let cmdline = cmdline::build(profile, devices, &config.cmdline)?;
    boot::write_boot_data(mem, &kernel, &cmdline, initrd.as_ref(), vcpus)?;
    let text = cmdline
        .as_cstring()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((kernel, text))
}

/// Step 6: the vCPUs; for a boot, with per-vCPU CPUID and the registers of the kernel's
/// entry mode (a restore sets their state afterwards).
fn create_vcpus(
    vm: &Vm,
    mem: &GuestMemory,
    kernel: Option<&LoadedKernel>,
    count: u8,
    (pio, mmio): (Arc<Bus>, Arc<Bus>),
    exit: &Arc<ExitNotifier>,
    control: &Arc<VcpuControl>,
) -> Result<Vec<Vcpu>, BuildError> {
    vcpu::install_kick_handler()?;
    let cpuid = vm.supported_cpuid()?;
    let mut vcpus = Vec::with_capacity(count.into());
    for index in 0..count {
        let fd = vm.create_vcpu(index)?;
        if let Some(kernel) = kernel {
            let mut cpuid = cpuid.clone();
            regs::patch_cpuid(&mut cpuid, index, count);
            regs::configure_vcpu(&fd, index, mem, kernel.mode, kernel.entry.0, &cpuid)?;
        }
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
    Ok(vcpus)
}

/// A restore's last step: KVM's VM state, each vCPU's, then the devices' (which may
/// interrupt the guest, so they come after the irqchip's state).
fn restore_state(
    vm: &Vm,
    vcpus: &[Vcpu],
    transports: &[Arc<Mutex<MmioTransport>>],
    state: &VmState,
) -> Result<(), BuildError> {
    state.kvm.restore(vm.fd())?;
    for (v, s) in vcpus.iter().zip(&state.vcpus) {
        v.restore_state(s)?;
    }
    for (t, s) in transports.iter().zip(&state.virtio) {
        lock(t).restore_state(s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allocator_hands_out_distinct_windows_and_lines_until_they_run_out() {
        let mut a = MmioAllocator::default();
        let first = a.allocate().unwrap();
        let second = a.allocate().unwrap();
        assert_eq!(first.base, layout::VIRTIO_MMIO_START);
        assert_eq!(second.base, first.base + layout::VIRTIO_MMIO_SIZE);
        assert_eq!(
            (first.irq, second.irq),
            (layout::IRQ_BASE, layout::IRQ_BASE + 1)
        );
        for _ in 2..MmioAllocator::MAX_DEVICES {
            a.allocate().unwrap();
        }
        assert!(matches!(
            a.allocate(),
            Err(BuildError::TooManyDevices { .. })
        ));
    }
}
