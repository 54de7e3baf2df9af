//! What KVM itself keeps for a VM and its vCPUs, read for a snapshot and written back into
//! a new VM: the in-kernel PIC, IOAPIC and PIT, the KVM clock, and per vCPU its
//! registers, special registers, XSAVE area, XCRs, debug registers, LAPIC, MSRs, pending
//! events, multiprocessing state, CPUID and TSC frequency.
//!
//! Reads happen while the vCPUs are parked outside `KVM_RUN` with no I/O left half done
//! (see `vcpu`); writes happen before the new VM's threads start. The order of the writes
//! follows what KVM expects: CPUID first, the LAPIC before the MSRs (the TSC deadline
//! timer), pending events last.

use std::time::Duration;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// Why the vCPUs' states could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum VcpuSaveError {
    #[error("the vCPUs did not all park within {0:?}")]
    NotParked(Duration),
    #[error("vCPU {0} did not save its state in time")]
    NoAnswer(usize),
    #[error("the VM ended while vCPU {vcpu}'s state was saved: {exit}")]
    VmEnded { vcpu: u8, exit: String },
    #[error("vCPU {vcpu}: {message} while its state was saved")]
    Panicked { vcpu: u8, message: String },
    #[error("vCPU {vcpu}: {source}")]
    Read {
        vcpu: u8,
        #[source]
        source: Box<SnapshotError>,
    },
}

/// Most MSRs read or written by one ioctl.
const MSR_CHUNK: usize = 64;

fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Kvm { what, source }
}

/// The VM-wide state KVM keeps: interrupt controllers, PIT and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmKvmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(kvm(format!("KVM_GET_IRQCHIP {chip_id}")))?;
    Ok(chip)
}

impl VmKvmState {
    /// Reads the VM's state (its vCPUs must be parked).
    pub fn save(fd: &VmFd) -> Result<Self, SnapshotError> {
        let mut clock = fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        // Flags such as KVM_CLOCK_REALTIME would make KVM_SET_CLOCK move the guest's clock
        // on by the time the snapshot lay on disk: the guest's monotonic time continues
        // from where it stopped instead, and the agent steps the wall clock.
        clock.flags = 0;
        Ok(VmKvmState {
            pit: fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock,
            pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Writes the state into a new VM whose irqchip and PIT exist.
    pub fn restore(&self, fd: &VmFd) -> Result<(), SnapshotError> {
        fd.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        fd.set_clock(&self.clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip)
                .map_err(kvm(format!("KVM_SET_IRQCHIP {}", chip.chip_id)))?;
        }
        Ok(())
    }
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Reads vCPU `index`'s state. `msr_list` is every MSR KVM lists; those this host
    /// cannot read are left out. The vCPU must be outside `KVM_RUN` with its last exit
    /// completed.
    pub fn save(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<Self, SnapshotError> {
        // The multiprocessing state first: reading it settles pending LAPIC events.
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?;
        Ok(VcpuState {
            index,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msr_list)?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Writes the state into a new vCPU.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|source| SnapshotError::Entries {
            what: format!("vCPU {} CPUID", self.index),
            source,
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(kvm("KVM_SET_TSC_KHZ"))?;
            }
        }
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        // SAFETY: `xsave` is a whole `kvm_xsave` (4 KiB): KVM reads no more than that
        // for a vCPU whose CPUID (set above) enables no extended XSAVE components beyond
        // it, which is what it was saved from.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        write_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

fn msrs_of(entries: &[kvm_msr_entry]) -> Result<Msrs, SnapshotError> {
    Msrs::from_entries(entries).map_err(|source| SnapshotError::Entries {
        what: "MSR list".into(),
        source,
    })
}

/// Reads every MSR of `list` this host lets KVM read: KVM stops at the first one it
/// cannot read, which is then left out.
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut saved = Vec::with_capacity(list.len());
    let mut rest: &[u32] = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_of(&entries)?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        if read < chunk.len() {
            log::debug!("snapshot: MSR {:#x} is not readable here", chunk[read]);
            rest = &rest[read + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(saved)
}

/// Writes `entries`; every one must be taken.
fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), SnapshotError> {
    for chunk in entries.chunks(MSR_CHUNK) {
        let written = fd.set_msrs(&msrs_of(chunk)?).map_err(kvm("KVM_SET_MSRS"))?;
        if written < chunk.len() {
            return Err(SnapshotError::MsrRefused {
                index: chunk[written].index,
            });
        }
    }
    Ok(())
}
