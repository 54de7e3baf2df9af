//! The plain description of a VM that the builder consumes: kernel, initramfs, command
//! line, memory, vCPUs and where the console goes. Validation of user-supplied sizes
//! lives here so that every front end gets the same errors.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Smallest guest memory runvm accepts: the kernel is loaded at 16 MiB and needs room
/// above it for its own allocations.
pub const MIN_MEM_MIB: u64 = 32;
/// Largest vCPU count: the guest kernel is built with `CONFIG_NR_CPUS=64`.
pub const MAX_VCPUS: u8 = 64;
/// Default guest memory when nothing asks for more.
pub const DEFAULT_MEM_MIB: u64 = 128;

/// Where the guest's serial console output goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutput {
    /// Discard it (the console is still scanned for kernel panics).
    #[default]
    Sink,
    /// The VMM's standard output.
    Stdout,
    /// Append to this file (created if missing).
    File(PathBuf),
}

/// Everything the builder needs to create and boot one VM.
///
/// The shape of the VM (memory, vCPUs, devices, kernel, command line) never depends on
/// the container that will run in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Uncompressed `vmlinux` (ELF with a PVH note) or a `bzImage`.
    pub kernel: PathBuf,
    /// Optional initramfs (cpio newc, compressed or not).
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line appended after runvm's own switches.
    pub cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs requested. The host profile may lower it (see `HostProfile`).
    pub vcpus: u8,
    /// Serial console destination.
    pub console: ConsoleOutput,
    /// Seccomp filters on the vCPU and device threads (see `seccomp`).
    #[serde(default)]
    pub seccomp: crate::seccomp::SeccompMode,
}

impl VmConfig {
    /// A config with runvm's defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: DEFAULT_MEM_MIB,
            vcpus: 1,
            console: ConsoleOutput::Sink,
            seccomp: crate::seccomp::SeccompMode::default(),
        }
    }

    /// Checks sizes against what runvm and the host support, and that the kernel and
    /// initramfs are readable files, before anything is created.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_file(&self.kernel, "kernel")?;
        if let Some(initrd) = &self.initrd {
            check_file(initrd, "initramfs")?;
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemoryTooSmall {
                mib: self.mem_mib,
                min: MIN_MEM_MIB,
            });
        }
        let host = host_memory_mib();
        if self.mem_mib > host {
            return Err(ConfigError::MemoryTooLarge {
                mib: self.mem_mib,
                host,
            });
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::BadVcpus {
                count: self.vcpus.into(),
                max: MAX_VCPUS,
            });
        }
        Ok(())
    }
}

fn check_file(path: &std::path::Path, what: &'static str) -> Result<(), ConfigError> {
    let unreadable = |reason: String| ConfigError::Unreadable {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| unreadable(e.to_string()))?;
    if !meta.is_file() {
        return Err(unreadable("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| unreadable(e.to_string()))?;
    Ok(())
}

/// Parses a vCPU count given as text, with the same range check as [`VmConfig::validate`].
pub fn parse_vcpus(text: &str) -> Result<u8, ConfigError> {
    let count: u64 = text.trim().parse().map_err(|_| ConfigError::NotANumber {
        what: "vCPU count",
        text: text.to_string(),
    })?;
    if count == 0 || count > u64::from(MAX_VCPUS) {
        return Err(ConfigError::BadVcpus {
            count,
            max: MAX_VCPUS,
        });
    }
    Ok(count as u8)
}

/// Parses a memory size in MiB given as text.
pub fn parse_mem_mib(text: &str) -> Result<u64, ConfigError> {
    text.trim().parse().map_err(|_| ConfigError::NotANumber {
        what: "memory size in MiB",
        text: text.to_string(),
    })
}

/// Total host memory in MiB (an upper bound for one guest).
pub fn host_memory_mib() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|i| i.ram_total() >> 20)
        .unwrap_or(u64::MAX)
}

/// Errors in a [`VmConfig`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("guest memory of {mib} MiB is too small: at least {min} MiB are needed")]
    MemoryTooSmall { mib: u64, min: u64 },
    #[error("guest memory of {mib} MiB is more than the host's {host} MiB")]
    MemoryTooLarge { mib: u64, host: u64 },
    #[error("{count} vCPUs is out of range: 1 to {max}")]
    BadVcpus { count: u64, max: u8 },
    #[error("{what} {text:?} is not a number")]
    NotANumber { what: &'static str, text: String },
    #[error("cannot read {what} {path}: {reason}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing_file() -> PathBuf {
        std::env::current_exe().unwrap()
    }

    #[test]
    fn defaults_validate() {
        VmConfig::new(existing_file()).validate().unwrap();
    }

    #[test]
    fn kernel_and_initrd_must_be_readable_files() {
        let e = VmConfig::new("/nonexistent/vmlinux")
            .validate()
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read kernel /nonexistent/vmlinux"),
            "{e}"
        );
        let e = VmConfig::new("/").validate().unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let mut c = VmConfig::new(existing_file());
        c.initrd = Some("/nonexistent/initrd".into());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Unreadable {
                what: "initramfs",
                ..
            })
        ));
    }

    #[test]
    fn sizes_are_checked() {
        let mut c = VmConfig::new(existing_file());
        c.mem_mib = 4;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooSmall { mib: 4, .. })
        ));
        c.mem_mib = u64::MAX >> 21;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        c.mem_mib = 64;
        c.vcpus = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::BadVcpus { count: 0, .. })
        ));
        c.vcpus = 65;
        assert!(c.validate().is_err());
    }

    #[test]
    fn parsing_rejects_nonsense() {
        assert_eq!(parse_vcpus("2"), Ok(2));
        assert!(parse_vcpus("0").is_err());
        assert!(parse_vcpus("1000").is_err());
        assert!(parse_vcpus("two").is_err());
        assert_eq!(parse_mem_mib(" 256 "), Ok(256));
        assert!(parse_mem_mib("-5").is_err());
        assert!(parse_mem_mib("1G").is_err());
    }
}
