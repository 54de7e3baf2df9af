//! The container lifecycle as a library: what each runc verb does, built from the state
//! directory, the bundle translation, hooks and the VMM process. The `runvm` binary's
//! verbs parse their arguments and call one function here.
//!
//! - `create`: check everything, start the detached VMM (`vmm_serve` in that process),
//!   wait for its ready report, record the state, run the create-time hooks, write the
//!   pid file; any failure removes what was made.
//! - `run`: `create` + `start` composed, or the VMM in this very process (foreground).
//! - `ops`: `start`, `kill`, `delete`, `pause`/`resume`, `update`.

mod create;
mod ops;
mod run;

use std::path::PathBuf;

pub use create::{check, create, vmm_serve, write_pid_file, Checked, CreateOptions};
pub use ops::{delete, kill, set_paused, start, update};
pub use run::{run_detached, run_foreground};

use crate::logging::LogFormat;
use crate::state::Status;

/// runc's global flags, as every verb (and the VMM process) sees them.
#[derive(Clone, Debug, clap::Args)]
pub struct Globals {
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
    /// Seccomp filters on the VMM's vCPU and device threads: `log` allows and logs (to the
    /// kernel log) the calls outside their lists; `off` is for debugging only.
    #[arg(long, global = true, value_enum, default_value = "enforce")]
    pub seccomp: SeccompFlag,
    /// Start containers' VMs from templates (snapshots of booted VMs of their shape),
    /// making a missing one in the background; `off` boots every VM.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "on",
        env = "RUNVM_TEMPLATES"
    )]
    pub templates: TemplatesFlag,
    /// Where templates live (default: <root>/.templates).
    #[arg(long, global = true, env = "RUNVM_TEMPLATE_DIR")]
    pub template_dir: Option<PathBuf>,
}

/// `--templates`' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TemplatesFlag {
    On,
    Off,
}

/// `--seccomp`'s values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompFlag {
    Enforce,
    Log,
    Off,
}

impl SeccompFlag {
    /// The flag's value on a command line.
    pub fn as_arg(self) -> &'static str {
        match self {
            SeccompFlag::Enforce => "enforce",
            SeccompFlag::Log => "log",
            SeccompFlag::Off => "off",
        }
    }

    /// The VMM's mode.
    pub fn mode(self) -> vmm::seccomp::SeccompMode {
        match self {
            SeccompFlag::Enforce => vmm::seccomp::SeccompMode::Enforce,
            SeccompFlag::Log => vmm::seccomp::SeccompMode::Log,
            SeccompFlag::Off => vmm::seccomp::SeccompMode::Off,
        }
    }
}

impl Globals {
    /// The template store.
    pub fn template_store(&self) -> crate::template::TemplateStore {
        crate::template::TemplateStore::new(
            self.template_dir
                .clone()
                .unwrap_or_else(|| self.root.join(".templates")),
        )
    }

    /// The template store a container of `plan` may restore from, when templates are on
    /// for it.
    pub fn templates_for(&self, plan: &crate::translate::Plan) -> Option<PathBuf> {
        (self.templates == TemplatesFlag::On && plan.template)
            .then(|| self.template_store().dir().to_path_buf())
    }

    /// The flags of a `runvm template create` for a container with `assets`: the assets
    /// and the seccomp mode, nothing of the container (not its root or log).
    pub fn template_builder_args(&self, assets: &crate::assets::Assets) -> Vec<std::ffi::OsString> {
        // The builder runs in /: relative paths would name other files there.
        let absolute = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.into());
        let mut v: Vec<std::ffi::OsString> = vec!["--kernel".into()];
        v.push(absolute(&assets.kernel).into());
        v.push("--initrd".into());
        v.push(absolute(&assets.initrd).into());
        v.push("--seccomp".into());
        v.push(self.seccomp.as_arg().into());
        v
    }

    /// The flags again, for a runvm process started on this one's behalf (the VMM).
    pub(crate) fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec!["--root".into(), self.root.clone().into()];
        v.push("--templates".into());
        v.push(match self.templates {
            TemplatesFlag::On => "on".into(),
            TemplatesFlag::Off => "off".into(),
        });
        v.push("--template-dir".into());
        v.push(self.template_store().dir().as_os_str().to_owned());
        for (flag, path) in [
            ("--kernel", &self.kernel),
            ("--initrd", &self.initrd),
            ("--log", &self.log),
        ] {
            if let Some(p) = path {
                v.push(flag.into());
                v.push(p.clone().into());
            }
        }
        v.push("--seccomp".into());
        v.push(self.seccomp.as_arg().into());
        v.push("--log-format".into());
        v.push(match self.log_format {
            LogFormat::Text => "text".into(),
            LogFormat::Json => "json".into(),
        });
        for (on, flag) in [
            (self.debug, "--debug"),
            (self.systemd_cgroup, "--systemd-cgroup"),
        ] {
            if on {
                v.push(flag.into());
            }
        }
        v
    }
}

/// Why a lifecycle step failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    #[error(transparent)]
    Translate(#[from] crate::translate::TranslateError),
    #[error(transparent)]
    Asset(#[from] crate::assets::AssetError),
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error(transparent)]
    Ready(#[from] crate::ready::ReadyError),
    #[error(transparent)]
    Supervisor(#[from] crate::supervisor::SupervisorError),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error(transparent)]
    Agent(#[from] crate::agent_client::ClientError),
    #[error("cannot {verb} container {id} in status {status}")]
    WrongState {
        verb: &'static str,
        id: String,
        status: Status,
    },
    #[error("container {id} is not running (status {status})")]
    NotRunning { id: String, status: Status },
    #[error("cannot delete container {id} in status {status}: stop it first or use --force")]
    DeleteRunning { id: String, status: Status },
    #[error("the VMM of container {0} did not end")]
    VmmStuck(String),
    /// A request runvm cannot serve, with why.
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the VMM process: {0}")]
    Spawn(#[source] std::io::Error),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> LifecycleError + 'a {
    move |source| LifecycleError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
