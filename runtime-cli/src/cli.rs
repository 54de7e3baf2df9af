//! The command line: runc's global flags and verbs, plus `boot` and `vm-run` for guests
//! without a bundle.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use runtime_cli::logging::LogFormat;

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
    /// cgroupsPath is in systemd's slice:prefix:name form.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility; runvm never checkpoints.
    #[arg(long, global = true, hide = true)]
    pub criu: Option<String>,
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
    /// Create a container (its VM boots, its process waits for `start`).
    Create(CreateArgs),
    /// Start a created container's process.
    Start(IdArg),
    /// Print a container's state as OCI JSON.
    State(IdArg),
    /// Send a signal to a container's process (default SIGTERM).
    Kill(KillArgs),
    /// Delete a container (a running one only with --force).
    Delete(DeleteArgs),
    /// Create and start a container, and wait for it unless --detach.
    Run(RunArgs),
    /// Run another process in a running container.
    Exec(ExecArgs),
    /// List the processes of a container.
    Ps(PsArgs),
    /// List containers.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Pause a container (its vCPUs stop).
    Pause(IdArg),
    /// Resume a paused container.
    Resume(IdArg),
    /// Print a container's events and statistics.
    Events(EventsArgs),
    /// Print what this runtime supports (OCI features JSON).
    Features,
    /// Write a default config.json.
    Spec(SpecArgs),
    /// Change a container's resources.
    Update(UpdateArgs),
    /// Boot a guest kernel and show its console (no container).
    Boot(BootArgs),
    /// Run a command in a fresh VM whose root is the agent initramfs.
    VmRun(VmRunArgs),
    /// Write the agent initramfs (used by `make`).
    #[command(hide = true)]
    Initramfs(InitramfsArgs),
    /// The VMM process of a container (started by `create`).
    #[command(hide = true)]
    VmmServe(VmmServeArgs),
}

#[derive(Debug, Args)]
pub struct IdArg {
    /// Container id.
    pub id: String,
}

#[derive(Debug, Args, Clone)]
pub struct CreateArgs {
    /// The bundle (directory with config.json).
    #[arg(long, short = 'b', default_value = ".")]
    pub bundle: PathBuf,
    /// Write the container's pid (its VMM process) here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the terminal's master (when process.terminal is set).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// chroot instead of pivot_root inside the VM.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility (no session keyring is created).
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Pass this many extra descriptors (from 3) to the container (not supported across the VM: must be 0).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Accepted for runc compatibility.
    #[arg(long, hide = true)]
    pub notify_socket: Option<PathBuf>,
    /// Container id.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Send the signal to every process of the container.
    #[arg(long, short = 'a')]
    pub all: bool,
    /// Container id.
    pub id: String,
    /// Signal name or number.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Delete even a running container (killing it).
    #[arg(long, short = 'f')]
    pub force: bool,
    /// Container id.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Return once the container started, leaving it running.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// process.json describing the process.
    #[arg(long, short = 'p')]
    pub process: Option<PathBuf>,
    /// Return once the process started.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Write the process's pid (its host-side proxy) here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Allocate a terminal.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Unix socket that receives the terminal's master.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Environment variable (KEY=VALUE), repeatable.
    #[arg(long, short = 'e')]
    pub env: Vec<String>,
    /// Working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// User as uid[:gid].
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Additional group ids, repeatable.
    #[arg(long = "additional-gids", short = 'g')]
    pub additional_gids: Vec<u32>,
    /// Set no_new_privileges.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Accepted for runc compatibility.
    #[arg(long, hide = true)]
    pub cap: Vec<String>,
    /// Accepted for runc compatibility.
    #[arg(long, default_value_t = 0, hide = true)]
    pub preserve_fds: u32,
    /// Accepted for runc compatibility.
    #[arg(long, hide = true)]
    pub process_label: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long, hide = true)]
    pub apparmor: Option<String>,
    /// Container id.
    pub id: String,
    /// Command and arguments (when --process is not given).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value = "table")]
    pub format: Format,
    /// Container id.
    pub id: String,
    /// ps(1) options (ignored: the processes live in the guest).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value = "table")]
    pub format: Format,
    /// Only ids.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Print statistics once and exit.
    #[arg(long)]
    pub stats: bool,
    /// Interval between statistics (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s")]
    pub interval: String,
    /// Container id.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Where to write config.json.
    #[arg(long, short = 'b', default_value = ".")]
    pub bundle: PathBuf,
    /// A config for rootless use.
    #[arg(long)]
    pub rootless: bool,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Resources as OCI linux.resources JSON ("-" for stdin).
    #[arg(long, short = 'r')]
    pub resources: Option<PathBuf>,
    /// Memory limit in bytes.
    #[arg(long)]
    pub memory: Option<String>,
    /// CPU quota (microseconds per period).
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    /// CPU period (microseconds).
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// Maximum number of pids.
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Container id.
    pub id: String,
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
pub struct VmmServeArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Descriptor to report readiness on.
    #[arg(long)]
    pub ready_fd: Option<i32>,
}

fn parse_mem(s: &str) -> Result<u64, String> {
    vmm::config::parse_mem_mib(s).map_err(|e| e.to_string())
}

fn parse_cpus(s: &str) -> Result<u8, String> {
    vmm::config::parse_vcpus(s).map_err(|e| e.to_string())
}
