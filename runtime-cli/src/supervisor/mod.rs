//! The VMM process of one container: it is the pid runvm reports, lives as long as the
//! container, and exits with the container process's status (code, or 128 + signal).
//!
//! `prepare` (before any other thread exists): the container's network namespace, a
//! private mount namespace with the share, the cgroup, the terminal; then the signal
//! thread, the VM, and the container's init prepared by the agent (blocked before exec).
//! `run`: the control socket, "ready" to `create`, the start, the wait, and the end of the
//! VM once the process's status and all of its output are in.

mod control_server;
pub(crate) mod jail;
mod namespaces;
mod network;
pub(crate) mod privileges;
mod templates;
mod terminal;

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::Signal;
use vmm::{ConsoleOutput, VmHandle};

use crate::agent_client::{AgentClient, ClientError, Control};
use crate::assets::Assets;
use crate::ready::ReadyWriter;
use crate::relay::{self, HostIo, Relay};
use crate::sandbox::{Launch, Sandbox, SandboxError};
use crate::state::{files, StateDir};
use crate::translate::Plan;
use crate::util::lock;
use crate::{cgroup, share};
use control_server::MainRequest;
pub use control_server::AGENT_CALL_TIMEOUT;
use terminal::Tty;

/// Id of the container's process in the agent.
pub const INIT_ID: &str = "init";
/// How long the agent may take to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the VM may take to end after the container process's status arrived.
const END_GRACE: Duration = Duration::from_secs(10);
/// Status reported when the container's VM died before its process finished.
pub const VM_DIED_STATUS: i32 = 255;

/// What the supervisor needs.
#[derive(Debug)]
pub struct SupervisorConfig {
    pub state: StateDir,
    pub plan: Plan,
    pub assets: Assets,
    pub console_socket: Option<PathBuf>,
    /// The caller's own terminal is the container's (`run` in the foreground).
    pub own_tty: bool,
    /// Start right after create (`run`).
    pub auto_start: bool,
    pub systemd_cgroup: bool,
    /// Seccomp filters on the VM's threads.
    pub seccomp: vmm::seccomp::SeccompMode,
    /// Once set up, keep only what the VMM needs: a minimal root (`jail`), the
    /// capabilities of `privileges`, and the supervisor's seccomp filter.
    pub shed_privileges: bool,
    /// The template store to restore the VM from (none: boot).
    pub templates: Option<PathBuf>,
}

/// Why the container could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("blocking signals: {0}")]
    Signals(#[source] nix::Error),
    #[error(transparent)]
    Namespace(#[from] namespaces::NamespaceError),
    #[error(transparent)]
    Share(#[from] share::ShareError),
    #[error(transparent)]
    Privileges(#[from] privileges::PrivilegeError),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error(transparent)]
    Seccomp(#[from] vmm::seccomp::SeccompError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    #[error("raw terminal: {0}")]
    RawTerminal(#[source] nix::Error),
    #[error("process.terminal is set but no --console-socket was given")]
    NoConsoleSocket,
    #[error("host end of the terminal: {0}")]
    Terminal(#[source] std::io::Error),
    #[error("signal thread: {0}")]
    SignalThread(#[source] std::io::Error),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Agent(#[from] ClientError),
    #[error("control socket {path}: {source}")]
    ControlSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Ends the VM on behalf of a signal (the container's status becomes 128 + the signal),
/// also while it still boots: a stop asked for before the VM runs stops it as it starts.
#[derive(Debug, Default)]
struct Stopper {
    inner: Mutex<(Option<VmHandle>, Option<i32>)>,
}

impl Stopper {
    fn stop(&self, signal: i32) {
        let mut s = lock(&self.inner);
        s.1.get_or_insert(128 + signal);
        if let Some(vm) = &s.0 {
            vm.stop();
        }
    }

    fn attach(&self, vm: VmHandle) {
        let mut s = lock(&self.inner);
        if s.1.is_some() {
            vm.stop();
        }
        s.0 = Some(vm);
    }

    fn vm(&self) -> Option<VmHandle> {
        lock(&self.inner).0.clone()
    }

    /// The status a stop stands for, or [`VM_DIED_STATUS`].
    fn status(&self) -> i32 {
        lock(&self.inner).1.unwrap_or(VM_DIED_STATUS)
    }
}

/// What the signal thread, the control connections and the main thread share.
#[derive(Debug)]
struct Shared {
    client: OnceLock<AgentClient>,
    net: OnceLock<vmm::devices::virtio::net::NetAttach>,
    stopper: Stopper,
    started: AtomicBool,
    mem_mib: u64,
}

impl Shared {
    fn is_started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }
}

/// Everything prepared by [`prepare`].
#[derive(Debug)]
pub struct Prepared {
    sandbox: Sandbox,
    control: Control,
    relay: Relay,
    tty: Option<Tty>,
    shared: Arc<Shared>,
}

impl Prepared {
    /// Ends the VM of a container that will not start (a create-time step after the
    /// preparation failed).
    pub fn abort(self) {
        let _ = self.sandbox.finish(Duration::ZERO);
        if let Some(t) = &self.tty {
            t.restore();
        }
    }
}

/// The virtio-fs backend holds a descriptor for each inode and open file the guest keeps:
/// the VMM may use as many as its hard limit allows (a guest that exhausts them stalls
/// only its own file system).
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            log::debug!("raising RLIMIT_NOFILE to {hard}: {e}");
        }
    }
}

/// Prepares the container: everything up to the init process blocked before exec.
/// Must be called before the process has any thread.
pub fn prepare(cfg: &SupervisorConfig) -> Result<Prepared, SupervisorError> {
    // Catchable signals wait for the signal thread; threads started later inherit this.
    relay::block_forwarded().map_err(SupervisorError::Signals)?;
    // SAFETY: installing SIG_IGN for SIGPIPE runs no handler code; failed writes then
    // report EPIPE instead of killing the VMM.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn) }
        .map_err(SupervisorError::Signals)?;
    raise_nofile();
    let hostname = cfg.plan.container.hostname.as_deref();
    namespaces::enter_all(&cfg.plan.namespaces, hostname)?;
    share::private_mount_namespace()?;
    let share_dir = cfg.state.file(files::SHARE);
    let plan = &cfg.plan;
    share::build(&share_dir, &plan.rootfs, &plan.binds)?;
    cgroup::join(
        &plan.cgroups_path,
        &plan.resources,
        cfg.systemd_cgroup,
        &cfg.state.id,
    )?;
    let tty = match plan.process.terminal {
        true => Some(Tty::open(cfg.console_socket.as_deref(), cfg.own_tty)?),
        false => None,
    };
    let console = ConsoleOutput::File(cfg.state.file(files::CONSOLE_LOG));
    let mut vm_config = plan.vm_config(&cfg.assets, console);
    vm_config.seccomp = cfg.seccomp;
    let profile = vmm::HostProfile::detect();
    // Opened before the jail: the VM maps the template's memory file later.
    let template = templates::find(cfg, &vm_config, &profile);
    let template_dir = template.as_ref().map(|t| t.dir.clone());
    shed_privileges(cfg, &vm_config)?;
    let shared = Arc::new(Shared {
        client: OnceLock::new(),
        net: OnceLock::new(),
        stopper: Stopper::default(),
        started: AtomicBool::new(false),
        mem_mib: plan.sizing.mem_mib,
    });
    let window = match &tty {
        Some(t) => Some(t.window().map_err(SupervisorError::Terminal)?),
        None => None,
    };
    let s = shared.clone();
    relay::forward_signals(move |sig| on_signal(&s, window.as_ref(), sig))
        .map_err(SupervisorError::SignalThread)?;

    let vsock = cfg.state.file(files::VSOCK);
    let s = shared.clone();
    let launch = Launch {
        config: vm_config,
        profile,
        vsock: &vsock,
        share: Some(&share_dir),
        ready_timeout: READY_TIMEOUT,
        template,
        identity: Some(hostname.map(str::to_string)),
    };
    let sandbox = Sandbox::launch(launch, move |vm| s.stopper.attach(vm))?;
    if let (_, Some(why)) = sandbox.origin() {
        if let Some(dir) = &template_dir {
            templates::note_refused(cfg, dir, why);
        }
    }
    let _ = shared.client.set(sandbox.client().clone());
    let _ = shared.net.set(sandbox.net());
    match create_init(cfg, sandbox.client(), tty.as_ref()) {
        Ok((control, relay)) => Ok(Prepared {
            sandbox,
            control,
            relay,
            tty,
            shared,
        }),
        Err(e) => {
            let _ = sandbox.finish(Duration::ZERO);
            if let Some(t) = &tty {
                t.restore();
            }
            Err(e)
        }
    }
}

/// Keeps only what the VMM needs (a detached VMM): its jail, the capabilities of
/// `privileges`, the supervisor seccomp filter. No thread exists yet, so all inherit it.
fn shed_privileges(cfg: &SupervisorConfig, vm: &vmm::VmConfig) -> Result<(), SupervisorError> {
    if !cfg.shed_privileges {
        return Ok(());
    }
    let mut files = vec![vm.kernel.as_path()];
    files.extend(vm.initrd.as_deref());
    jail::enter(&jail::JailPlan {
        state_dir: &cfg.state.dir,
        files,
    })?;
    privileges::drop_privileges()?;
    vmm::seccomp::install(vmm::seccomp::ThreadKind::Supervisor, cfg.seccomp)?;
    Ok(())
}

/// The signal thread's work: resizes for SIGWINCH, a stop before the process runs, the
/// signal itself to the process after.
fn on_signal(shared: &Shared, window: Option<&File>, sig: Signal) {
    let client = shared.client.get();
    let result = match (sig, window, client) {
        (Signal::SIGWINCH, Some(w), Some(client)) => match crate::console::window_size(w.as_fd()) {
            Some((rows, cols)) => client
                .control_within(AGENT_CALL_TIMEOUT)
                .and_then(|mut c| c.resize(INIT_ID, rows, cols)),
            None => Ok(()),
        },
        (Signal::SIGWINCH, _, _) => Ok(()),
        (_, _, Some(client)) if shared.is_started() => client
            .control_within(AGENT_CALL_TIMEOUT)
            .and_then(|mut c| c.signal(INIT_ID, sig as i32, false)),
        _ => {
            shared.stopper.stop(sig as i32);
            Ok(())
        }
    };
    if let Err(e) = result {
        log::debug!("forwarding {sig}: {e}");
    }
}

/// Registers the container's init with the agent (which builds the container and blocks
/// it before exec) and attaches its stdio.
fn create_init(
    cfg: &SupervisorConfig,
    client: &AgentClient,
    tty: Option<&Tty>,
) -> Result<(Control, Relay), SupervisorError> {
    let io = match tty {
        Some(t) => t.host_io().map_err(SupervisorError::Terminal)?,
        None => HostIo::inherited().map_err(SupervisorError::Terminal)?,
    };
    let mut control = client.control()?;
    let spec = Some(cfg.plan.container.clone());
    control.create(INIT_ID, cfg.plan.process.clone(), io.stdio(), true, spec)?;
    let relay = Relay::attach(client, INIT_ID, io)?;
    Ok((control, relay))
}

/// How waiting for the start ended.
enum StartOutcome {
    /// The process runs.
    Started,
    /// The process could not exec; this status stands for it.
    Failed(i32),
    /// The VM ended first.
    VmEnded,
    /// The process was not started (its network could not be set up).
    Refused,
}

/// Runs the prepared container to its end; returns the exit status for the VMM process.
pub fn run(cfg: &SupervisorConfig, p: Prepared, ready: Option<ReadyWriter>) -> i32 {
    let Prepared {
        sandbox,
        mut control,
        relay,
        tty,
        shared,
    } = p;
    let ctl_path = cfg.state.file(files::CONTROL);
    let _ = std::fs::remove_file(&ctl_path);
    let listener = match vmm::unix_path::bind(&ctl_path) {
        Ok(l) => l,
        Err(source) => {
            let e = SupervisorError::ControlSocket {
                path: ctl_path,
                source,
            };
            if let Some(r) = ready {
                r.fail(&e.to_string());
            }
            let _ = sandbox.finish(Duration::ZERO);
            return 1;
        }
    };
    let (tx, rx) = mpsc::channel::<MainRequest>();
    let (s, t) = (shared.clone(), tx.clone());
    std::thread::spawn(move || control_server::serve(listener, s, t));
    watch_vm_end(&sandbox, &control, tx);
    if let Some(r) = ready {
        r.ok();
    }

    let mut wired = None;
    let status = match wait_for_start(cfg, &rx, &mut control, &shared, &mut wired) {
        StartOutcome::VmEnded => shared.stopper.status(),
        StartOutcome::Refused => {
            sandbox.handle().stop();
            1
        }
        StartOutcome::Failed(status) => status,
        StartOutcome::Started => match control.wait(INIT_ID) {
            Ok(status) => status,
            Err(e) => {
                let status = shared.stopper.status();
                if status == VM_DIED_STATUS {
                    log::error!(
                        "container {}: lost the container process: {e}",
                        cfg.state.id
                    );
                }
                status
            }
        },
    };
    let exit = finish(sandbox, control, relay);
    if let Some(interface) = &wired {
        network::release_here(cfg, interface);
    }
    if let Some(t) = &tty {
        t.restore();
    }
    let _ = crate::state::write_private(
        &cfg.state.file(files::EXIT),
        format!("{status}\n").as_bytes(),
    );
    log::debug!(
        "container {}: VM ended ({exit}), status {status}",
        cfg.state.id
    );
    status
}

/// The VM's end unblocks the main thread wherever it waits: on the channel, or on the
/// agent's control connection.
fn watch_vm_end(sandbox: &Sandbox, control: &Control, tx: mpsc::Sender<MainRequest>) {
    let vm = sandbox.handle();
    let watched = control.try_clone_stream().ok();
    std::thread::spawn(move || {
        vm.wait_ended(None);
        if let Some(s) = watched {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = tx.send(MainRequest::Ended);
    });
}

/// Starts the process on `start` (or at once with `auto_start`, after taking over the
/// container's network: the interface wired goes to `wired`).
fn wait_for_start(
    cfg: &SupervisorConfig,
    rx: &mpsc::Receiver<MainRequest>,
    control: &mut Control,
    shared: &Shared,
    wired: &mut Option<String>,
) -> StartOutcome {
    let reply = if cfg.auto_start {
        match network::take_over_here(cfg, shared) {
            Ok(w) => *wired = w,
            Err(e) => {
                eprintln!("runvm: {e}");
                return StartOutcome::Refused;
            }
        }
        None
    } else {
        match rx.recv() {
            Ok(MainRequest::Start(reply)) => Some(reply),
            Ok(MainRequest::Ended) | Err(_) => return StartOutcome::VmEnded,
        }
    };
    let result = control.start(INIT_ID);
    if result.is_ok() {
        shared.started.store(true, Ordering::SeqCst);
    }
    let response = match &result {
        Ok(_) => crate::control::ControlResponse::Ok,
        Err(e) => crate::control::ControlResponse::Error {
            message: e.to_string(),
        },
    };
    match reply {
        Some(reply) => {
            let _ = reply.send(response);
        }
        None => {
            if let Err(e) = &result {
                eprintln!("runvm: {e}");
            }
        }
    }
    match result {
        Ok(_) => StartOutcome::Started,
        // The process could not exec: its status stands.
        Err(_) => StartOutcome::Failed(control.wait(INIT_ID).unwrap_or(1)),
    }
}

/// Delivers all output, then ends the VM (it ends by itself after its init's status went
/// out; a VM that is already gone must first let go of its streams).
fn finish(sandbox: Sandbox, control: Control, relay: Relay) -> vmm::VmExit {
    let vm_gone = sandbox.handle().wait_ended(Some(Duration::ZERO)).is_some();
    if vm_gone {
        drop(control);
        let exit = sandbox.finish(Duration::ZERO);
        relay.finish();
        exit
    } else {
        relay.finish();
        drop(control);
        sandbox.finish(END_GRACE)
    }
}
