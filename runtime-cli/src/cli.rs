//! The command line: runc's global flags and verbs, plus `boot` and `vm-run` for guests
//! without a bundle.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use runtime_cli::exec::ExecOptions;
use runtime_cli::lifecycle::{CreateOptions, Globals};

/// runvm: an OCI runtime that runs each container in its own KVM micro-VM.
#[derive(Debug, Parser)]
#[command(name = "runvm", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a container (its VM boots, its process waits for `start`).
    Create(CreateOptions),
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
    Exec(ExecOptions),
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
    /// Make, list or remove VM templates (booted VMs that containers start from).
    #[command(subcommand)]
    Template(TemplateCommand),
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
    pub create: CreateOptions,
    /// Return once the container started, leaving it running.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub keep: bool,
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
    /// Once the console shows a line containing this text, snapshot the VM into
    /// --snapshot's directory and end it.
    #[arg(long, requires = "snapshot")]
    pub snapshot_on: Option<String>,
    /// Directory (created) for the snapshot --snapshot-on takes.
    #[arg(long, requires = "snapshot_on", conflicts_with = "restore")]
    pub snapshot: Option<PathBuf>,
    /// Resume the VM saved in this directory instead of booting.
    #[arg(long)]
    pub restore: Option<PathBuf>,
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

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Boot a VM of a shape and save it as that shape's template (prints its key).
    Create(TemplateCreateArgs),
    /// List the templates.
    #[command(visible_alias = "ls")]
    List(TemplateListArgs),
    /// Remove templates (VMs started from them keep running).
    Rm(TemplateRmArgs),
}

#[derive(Debug, Args)]
pub struct TemplateCreateArgs {
    /// Guest memory in MiB (a container's memory limit).
    #[arg(long, default_value_t = vmm::config::DEFAULT_MEM_MIB, value_parser = parse_mem)]
    pub memory: u64,
    /// Number of vCPUs (from a container's CPU quota).
    #[arg(long, default_value_t = 1, value_parser = parse_cpus)]
    pub vcpus: u8,
    /// Kernel parameters (a bundle's vm.kernel.parameters).
    #[arg(long, default_value = "")]
    pub kernel_params: String,
    /// The build lock, taken by the runvm that started this one (internal).
    #[arg(long, hide = true)]
    pub lock_fd: Option<i32>,
}

#[derive(Debug, Args)]
pub struct TemplateListArgs {
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct TemplateRmArgs {
    /// Remove every template.
    #[arg(long, conflicts_with = "keys")]
    pub all: bool,
    /// Keys of the templates to remove.
    #[arg(required_unless_present = "all")]
    pub keys: Vec<String>,
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
    pub create: CreateOptions,
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
