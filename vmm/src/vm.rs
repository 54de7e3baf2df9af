//! The KVM virtual machine: `/dev/kvm`, the VM file descriptor, guest memory slots, the
//! in-kernel interrupt controllers and PIT, and the eventfd wiring (irqfd, ioeventfd).

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemory as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::IrqLine;
use crate::memory::GuestMemory;

/// Where KVM may place the three pages of its TSS (below the IOAPIC, outside RAM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "/dev/kvm does not exist: this host offers no KVM (enable virtualization and load kvm)"
    )]
    NoKvm,
    #[error("permission denied opening /dev/kvm: run as root or as a member of its group")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a capability runvm needs: {0:?}")]
    MissingCap(Cap),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A KVM VM with its in-kernel irqchip.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens `/dev/kvm`, checks what runvm relies on and creates an empty VM.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENXIO | libc::ENODEV => VmError::NoKvm,
            libc::EACCES | libc::EPERM => VmError::KvmPermission,
            _ => VmError::KvmOpen(e),
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for cap in [
            Cap::Irqchip,
            Cap::Ioeventfd,
            Cap::Irqfd,
            Cap::UserMemory,
            Cap::Pit2,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        Ok(Vm { kvm, fd })
    }

    /// Maps every region of `mem` into the guest.
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region's host mapping lives as long as `mem`, which the VMM keeps
            // alive (and never unmaps) for the VM's whole life.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Creates the in-kernel PIC/IOAPIC/LAPICs and the PIT. Must precede vCPU creation.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(())
    }

    /// Routes writes to `line`'s eventfd to its GSI.
    pub fn register_irq(&self, line: &IrqLine) -> Result<(), VmError> {
        self.fd
            .register_irqfd(line.eventfd(), line.gsi())
            .map_err(kvm_err("KVM_IRQFD"))
    }

    /// Makes guest writes of `datamatch` to MMIO `addr` signal `evt` without a VM exit.
    pub fn register_mmio_notify(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    /// The CPUID KVM supports on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
    }

    /// The VM's descriptor (for saving and restoring KVM's state of it).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Every MSR KVM can save and restore for a vCPU.
    pub fn msr_index_list(&self) -> Result<Vec<u32>, VmError> {
        self.kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(id.into())
            .map_err(kvm_err("KVM_CREATE_VCPU"))
    }
}
