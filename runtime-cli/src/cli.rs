//! The command line: runc's global flags and verbs, plus `boot` for booting a bare guest.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;

/// runvm: an OCI runtime that runs each container in its own KVM micro-VM.
#[derive(Debug, Parser)]
#[command(name = "runvm", version, about, propagate_version = true)]
pub struct Cli {
    /// Directory for container state.
    #[arg(long, global = true, default_value = "/run/runvm")]
    pub root: PathBuf,
    /// Write log messages to this file instead of stderr.
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Format of log messages.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log debug messages.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Guest kernel (default: $RUNVM_KERNEL, then <bindir>/../share/runvm/vmlinux).
    #[arg(long, global = true)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (default: $RUNVM_INITRD, then <bindir>/../share/runvm/initramfs.cpio).
    #[arg(long, global = true)]
    pub initrd: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest kernel and show its console (no container).
    Boot(BootArgs),
    /// Run a command in a fresh VM whose root is the agent initramfs.
    VmRun(VmRunArgs),
    /// Write the agent initramfs (used by `make`).
    #[command(hide = true)]
    Initramfs(InitramfsArgs),
}

#[derive(Debug, Args)]
pub struct VmRunArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = vmm::config::DEFAULT_MEM_MIB, value_parser = parse_mem)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = parse_cpus)]
    pub cpus: u8,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Environment variable for the command (KEY=VALUE), repeatable.
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Working directory of the command.
    #[arg(long, default_value = "/")]
    pub cwd: String,
    /// Save the guest console here.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InitramfsArgs {
    /// The static guest agent binary; it becomes /init.
    #[arg(long)]
    pub agent: PathBuf,
    /// Where to write the cpio archive.
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = vmm::config::DEFAULT_MEM_MIB, value_parser = parse_mem)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = parse_cpus)]
    pub cpus: u8,
    /// Write the console here instead of stdout.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
}

fn parse_mem(s: &str) -> Result<u64, String> {
    vmm::config::parse_mem_mib(s).map_err(|e| e.to_string())
}

fn parse_cpus(s: &str) -> Result<u8, String> {
    vmm::config::parse_vcpus(s).map_err(|e| e.to_string())
}
