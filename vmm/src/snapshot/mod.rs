//! Snapshots of a running VM, and what a new VMM process needs to resume one: the VM's
//! [`Shape`] (what a snapshot may be restored into), the saved state of KVM, the vCPUs and
//! every device ([`VmState`]), and guest memory.
//!
//! A snapshot is two files in one directory: `state` (a small versioned file, checked by
//! its length and SHA-256 before anything is restored, `file`) and `memory` (guest RAM
//! behind a header page that ties it to its state, mapped copy-on-write by every VM
//! restored from it, `memory`). What KVM keeps is read and written in `kvm_state`; each
//! device saves and restores itself next to its model.

pub mod file;
pub mod kvm_state;
pub mod memory;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::VmConfig;
use crate::devices::serial::SerialState;
use crate::devices::virtio::mmio::MmioState;
use crate::host_profile::HostProfile;
pub use file::{load, save, Snapshot};
pub use kvm_state::{VcpuSaveError, VcpuState, VmKvmState};

/// Version of the state and memory file formats; a snapshot of another version is refused.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Errors saving, loading or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {path} is not usable: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("snapshot {path} is of another VM shape ({differs} differ)")]
    ShapeMismatch { path: PathBuf, differs: String },
    #[error("KVM {what}: {source}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("encoding the snapshot state: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("{what}: {source}")]
    Entries {
        what: String,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    #[error("KVM refused to restore MSR {index:#x}")]
    MsrRefused { index: u32 },
    #[error("reading guest memory: {0}")]
    ReadMemory(#[source] vm_memory::GuestMemoryError),
    #[error("mapping guest memory from {path}: {source}")]
    MapMemory {
        path: PathBuf,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("memory file {path}: a region at {guest_addr:#x} of {size} bytes overflows")]
    RegionOverflow {
        path: PathBuf,
        guest_addr: u64,
        size: u64,
    },
    #[error("memory file {path}: its regions do not form a guest memory: {source}")]
    Regions {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestRegionCollectionError,
    },
    #[error("the VM has ended")]
    VmEnded,
    #[error("saving the vCPUs: {0}")]
    Vcpus(#[from] VcpuSaveError),
    #[error("serial state: {0}")]
    Serial(#[source] vm_superio::serial::Error<std::io::Error>),
}

impl SnapshotError {
    pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| SnapshotError::Io { what, path, source }
    }

    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        SnapshotError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Which file a VM was built from: enough to tell a replaced or rebuilt file from the
/// one a snapshot was taken with, without reading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i128,
    pub dev: u64,
    pub ino: u64,
}

impl FileIdentity {
    /// The identity of `path` as it is now.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            path: path.to_path_buf(),
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Everything a snapshot depends on: the VMM build, the host profile, the kernel and
/// initramfs, the command line, memory, vCPUs and the virtio devices in their order.
/// A snapshot is restored only into a VM of the same shape; its [`Shape::key`] names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub format: u32,
    /// This VMM's version and binary.
    pub vmm: String,
    pub vmm_binary: Option<FileIdentity>,
    /// The host profile (what it adds to the command line, how many vCPUs it allows).
    pub host: String,
    /// The host's kernel and what its KVM offers a vCPU (CPUID, MSRs), hashed: a
    /// snapshot restores the CPUID and registers it saved, which another host (or this one
    /// after an update) may not support.
    pub host_cpu: String,
    pub kernel: FileIdentity,
    pub initrd: Option<FileIdentity>,
    /// The command line runvm's own switches are appended to.
    pub cmdline: String,
    pub mem_mib: u64,
    /// vCPUs the VM really has (after the host profile).
    pub vcpus: u8,
    /// Virtio device types, in the order of their MMIO windows.
    pub devices: Vec<u32>,
}

impl Shape {
    /// The shape of `config` with `devices` on a host with `profile`.
    pub fn of(config: &VmConfig, profile: &HostProfile, devices: &[u32]) -> std::io::Result<Self> {
        let binary = std::env::current_exe()
            .ok()
            .and_then(|p| FileIdentity::of(&p).ok());
        Ok(Shape {
            format: FORMAT_VERSION,
            vmm: format!("{} {}", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION")),
            vmm_binary: binary,
            host: profile.describe(),
            // Without KVM no VM runs: the shape then names only that.
            host_cpu: host_cpu().unwrap_or_else(|e| format!("no KVM: {e}")),
            kernel: FileIdentity::of(&config.kernel)?,
            initrd: config.initrd.as_deref().map(FileIdentity::of).transpose()?,
            cmdline: config.cmdline.clone(),
            mem_mib: config.mem_mib,
            vcpus: profile.vcpus(config.vcpus),
            devices: devices.to_vec(),
        })
    }

    /// The parts in which `other` differs from this shape.
    pub fn differences(&self, other: &Shape) -> Vec<&'static str> {
        let mut d = Vec::new();
        let mut check = |differs: bool, what: &'static str| {
            if differs {
                d.push(what);
            }
        };
        check(self.format != other.format, "format");
        check(
            self.vmm != other.vmm || self.vmm_binary != other.vmm_binary,
            "runvm binary",
        );
        check(self.host != other.host, "host profile");
        check(self.host_cpu != other.host_cpu, "host CPU or KVM");
        check(self.kernel != other.kernel, "kernel");
        check(self.initrd != other.initrd, "initramfs");
        check(self.cmdline != other.cmdline, "kernel parameters");
        check(self.mem_mib != other.mem_mib, "memory");
        check(self.vcpus != other.vcpus, "vCPUs");
        check(self.devices != other.devices, "devices");
        d
    }

    /// A short name for this shape: the first 128 bits of the SHA-256 of its JSON, in hex.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&json);
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A hash of the host kernel's release and of the CPUID and MSR list its KVM supports.
fn host_cpu() -> std::io::Result<String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(std::io::Error::from)?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(std::io::Error::from)?;
    let msrs = kvm.get_msr_index_list().map_err(std::io::Error::from)?;
    let mut h = Sha256::new();
    // SAFETY: an all-zero utsname is valid for uname to fill.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the struct it is given.
    if unsafe { libc::uname(&mut uts) } == 0 {
        let release: Vec<u8> = uts.release.iter().map(|&c| c as u8).collect();
        h.update(&release);
    }
    for e in cpuid.as_slice() {
        // KVM fills in the APIC id of the host CPU that answered: not a feature.
        let (mut eax, mut ebx, mut edx) = (e.eax, e.ebx, e.edx);
        match e.function {
            0x1 => ebx &= 0x00ff_ffff,
            0xb | 0x1f => edx = 0,
            0x8000_001e => eax = 0,
            _ => {}
        }
        let words = [e.function, e.index, e.flags, eax, ebx, e.ecx, edx];
        for w in words {
            h.update(w.to_le_bytes());
        }
    }
    for m in msrs.as_slice() {
        h.update(m.to_le_bytes());
    }
    Ok(h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Where one region of guest RAM lies in the guest and in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// The saved state of a whole VM but its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub shape: Shape,
    /// Random id written into the memory file's header too: the two files belong together.
    pub memory_id: String,
    pub regions: Vec<RegionState>,
    /// The command line the guest booted with.
    pub cmdline: String,
    pub kvm: VmKvmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialState,
    pub virtio: Vec<MmioState>,
}

/// Fills `buf` from the kernel's random pool (getrandom(2), which needs no device node).
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

/// A fresh random id (128 bits, hex).
pub(crate) fn random_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    fill_random(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        let exe = std::env::current_exe().unwrap();
        VmConfig::new(exe)
    }

    #[test]
    fn the_key_follows_every_part_of_the_shape() {
        let profile = HostProfile::for_kind(crate::HostKind::HardwareKvm);
        let base = Shape::of(&config(), &profile, &[19, 1, 26]).unwrap();
        assert_eq!(base.key().len(), 32);
        assert_eq!(
            base.key(),
            Shape::of(&config(), &profile, &[19, 1, 26]).unwrap().key()
        );
        let mut c = config();
        c.mem_mib = 256;
        let bigger = Shape::of(&c, &profile, &[19, 1, 26]).unwrap();
        assert_ne!(base.key(), bigger.key());
        let fewer = Shape::of(&config(), &profile, &[19, 26]).unwrap();
        assert_ne!(base.key(), fewer.key());
        let soft = HostProfile::for_kind(crate::HostKind::SoftwareKvm);
        assert_ne!(
            base.key(),
            Shape::of(&config(), &soft, &[19, 1, 26]).unwrap().key()
        );
        let mut c = config();
        c.cmdline = "quiet".into();
        assert_ne!(
            base.key(),
            Shape::of(&c, &profile, &[19, 1, 26]).unwrap().key()
        );
    }

    #[test]
    fn the_host_cpu_part_is_the_same_on_every_host_cpu() {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        let Ok(here) = host_cpu() else {
            return; // no KVM here: nothing to compare
        };
        let allowed = sched_getaffinity(Pid::from_raw(0)).unwrap();
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| allowed.is_set(c).unwrap_or(false))
            .take(8)
            .collect();
        for cpu in cpus {
            let on_cpu = std::thread::spawn(move || {
                let mut set = CpuSet::new();
                set.set(cpu).unwrap();
                sched_setaffinity(Pid::from_raw(0), &set).unwrap();
                host_cpu().unwrap()
            })
            .join()
            .unwrap();
            assert_eq!(on_cpu, here, "on CPU {cpu}");
        }
    }

    #[test]
    fn random_ids_differ() {
        let a = random_id().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_id().unwrap());
    }
}
