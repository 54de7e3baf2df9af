//! Host-compatibility profile: the one place that knows how this host's KVM differs from
//! hardware virtualization, and what runvm adds so the same guest kernel runs on both.
//!
//! On hardware KVM (VMX/SVM) the profile adds nothing. On software KVM hosts (the page-table
//! based nested hypervisor `kvm_pvm`), guest ring 0 runs through KVM's instruction emulator,
//! which cannot execute some instructions; the profile turns them off on the guest command
//! line and limits the VM to one vCPU. The guest kernel carries the rest of the workarounds
//! as patches (kernel-config/patches/), all inert on hardware KVM.

use std::path::Path;

/// What kind of KVM this host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// VMX or SVM: the guest runs natively.
    HardwareKvm,
    /// `kvm_pvm`: guest ring 0 is emulated instruction by instruction.
    SoftwareKvm,
}

/// Kernel switches software KVM needs. Each entry: the switch, then the failure it prevents.
const SOFTWARE_KVM_ARGS: &[(&str, &str)] = &[
    (
        // The kernel keeps only the first 127 characters of clearcpuid= and only the last
        // occurrence on the line, so every feature goes into this one switch.
        "clearcpuid=xsave,popcnt,cx16,erms,fsrm,rdrand,rdseed,fsgsbase,smap,smep,pcid,invpcid,pku,umip",
        "the emulator stops the VM (KVM_EXIT_INTERNAL_ERROR) on xsave/xrstor, popcnt, cmpxchg16b, \
         rdrand/rdseed, fsgsbase, stac/clac, invpcid, rdpkru and umip-trapped instructions in ring 0; \
         erms/fsrm make memcpy/memset use byte-wise rep movs/stos, emulated one byte per step",
    ),
    (
        "noreplace-smp",
        "patching lock prefixes at boot costs seconds of emulated text_poke",
    ),
    (
        // Not a kernel switch: the kernel hands unknown NAME=value words to /init as its
        // environment, and runvm's agent passes this one on to every process it starts.
        "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL,-AVX_Fast_Unaligned_Load",
        "guest user space runs with the host's XCR0, but the guest kernel (clearcpuid=xsave) \
         preserves only x87/SSE registers across context switches, so AVX register contents \
         leak between guest processes and corrupt data; glibc's string and memory functions \
         then stay off AVX. Code that uses AVX registers directly is not covered",
    ),
];

/// The workarounds that apply on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostProfile {
    kind: HostKind,
}

impl HostProfile {
    /// Detects the host kind. `RUNVM_HOST_KIND=hardware|software` overrides detection.
    pub fn detect() -> Self {
        let kind = match std::env::var("RUNVM_HOST_KIND").as_deref() {
            Ok("hardware") => HostKind::HardwareKvm,
            Ok("software") => HostKind::SoftwareKvm,
            _ => Self::detect_kind(Path::new("/sys/module")),
        };
        HostProfile { kind }
    }

    /// A profile for a known host kind.
    pub fn for_kind(kind: HostKind) -> Self {
        HostProfile { kind }
    }

    fn detect_kind(sys_module: &Path) -> HostKind {
        if sys_module.join("kvm_pvm").exists() {
            HostKind::SoftwareKvm
        } else {
            HostKind::HardwareKvm
        }
    }

    /// The host kind.
    pub fn kind(&self) -> HostKind {
        self.kind
    }

    /// Kernel command-line switches this host needs, in order.
    pub fn kernel_args(&self) -> impl Iterator<Item = &'static str> {
        let args: &[(&str, &str)] = match self.kind {
            HostKind::HardwareKvm => &[],
            HostKind::SoftwareKvm => SOFTWARE_KVM_ARGS,
        };
        args.iter().map(|(arg, _why)| *arg)
    }

    /// The environment variable the agent must pass to guest processes, if any.
    pub fn guest_env(&self) -> Option<&'static str> {
        self.kernel_args()
            .find(|a| a.starts_with("GLIBC_TUNABLES="))
    }

    /// The number of vCPUs this host can boot, given what was asked for.
    ///
    /// Software KVM hangs while bringing up secondary CPUs, so it gets one.
    pub fn vcpus(&self, requested: u8) -> u8 {
        match self.kind {
            HostKind::HardwareKvm => requested,
            HostKind::SoftwareKvm => 1,
        }
    }

    /// One line for debug logs.
    pub fn describe(&self) -> String {
        match self.kind {
            HostKind::HardwareKvm => "hardware KVM: no workarounds".to_string(),
            HostKind::SoftwareKvm => format!(
                "software KVM (kvm_pvm): 1 vCPU, guest switches: {}",
                self.kernel_args().collect::<Vec<_>>().join(" ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_adds_nothing() {
        let p = HostProfile::for_kind(HostKind::HardwareKvm);
        assert_eq!(p.kernel_args().count(), 0);
        assert_eq!(p.guest_env(), None);
        assert_eq!(p.vcpus(4), 4);
    }

    #[test]
    fn software_limits_vcpus_and_adds_switches() {
        let p = HostProfile::for_kind(HostKind::SoftwareKvm);
        assert_eq!(p.vcpus(4), 1);
        assert!(p.guest_env().unwrap().contains("-AVX2"));
        let args: Vec<_> = p.kernel_args().collect();
        assert!(args.iter().any(|a| a.starts_with("clearcpuid=")));
        // The kernel truncates clearcpuid= after 127 characters of value.
        for a in args {
            if let Some(v) = a.strip_prefix("clearcpuid=") {
                assert!(v.len() <= 127, "{a} is too long");
            }
        }
    }

    #[test]
    fn detection_looks_for_kvm_pvm() {
        let dir = std::env::temp_dir().join(format!("runvm-hp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(HostProfile::detect_kind(&dir), HostKind::HardwareKvm);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(HostProfile::detect_kind(&dir), HostKind::SoftwareKvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
