//! `create`: everything that can be checked is checked before anything exists; then the
//! state directory, the detached VMM process (this binary as `vmm-serve`) and its ready
//! report over a pipe, the recorded state, the create-time hooks and the pid file. Any
//! failure kills the VMM and removes the state directory.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::assets::Assets;
use crate::bundle::Bundle;
use crate::container::Container;
use crate::hooks::{self, Phase};
use crate::ready::{ReadyReader, ReadyWriter};
use crate::state::{process_start_time, State, StateDir, Status, OCI_VERSION};
use crate::supervisor::{self, SupervisorConfig};
use crate::translate::{self, Plan};

use super::{io_err, Globals, LifecycleError};

/// The descriptor the VMM reports readiness on.
const READY_FD: i32 = 3;
/// How long a VMM that must go may take to end.
pub(super) const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// `create`'s arguments (also `run`'s and the VMM process's).
#[derive(Clone, Debug, clap::Args)]
pub struct CreateOptions {
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

/// A container that passed every check, not created yet.
#[derive(Debug)]
pub struct Checked {
    pub dir: StateDir,
    pub bundle: Bundle,
    pub plan: Plan,
    pub assets: Assets,
}

/// Checks everything that can be checked before anything is created. With `own_tty`, a
/// terminal may be the caller's own instead of one sent over a console socket.
pub fn check(g: &Globals, o: &CreateOptions, own_tty: bool) -> Result<Checked, LifecycleError> {
    let dir = StateDir::new(&g.root, &o.id)?;
    if o.preserve_fds > 0 {
        return Err(LifecycleError::Invalid(
            "--preserve-fds is not supported: descriptors cannot be passed into the VM".into(),
        ));
    }
    let bundle = Bundle::load(&o.bundle)?;
    let mut plan = translate::plan(&bundle, &o.id, o.no_pivot)?;
    own_network_is_none(&mut plan, &o.id)?;
    let assets = plan.assets(g.kernel.as_deref(), g.initrd.as_deref())?;
    plan.vm_config(&assets, vmm::ConsoleOutput::Sink)
        .validate()
        .map_err(|e| LifecycleError::Invalid(e.to_string()))?;
    if let Some(p) = &o.pid_file {
        let parent = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(LifecycleError::Invalid(format!(
                "pid file directory {} does not exist",
                parent.display()
            )));
        }
    }
    match (&o.console_socket, plan.process.terminal) {
        (Some(s), _) if !s.exists() => {
            return Err(LifecycleError::Invalid(format!(
                "console socket {} does not exist",
                s.display()
            )))
        }
        (None, true) if !own_tty => {
            return Err(LifecycleError::Invalid(
                "process.terminal is set: a --console-socket is needed".into(),
            ))
        }
        _ => {}
    }
    if dir.exists() {
        return Err(crate::state::StateError::Exists(o.id.clone()).into());
    }
    let in_use = crate::cgroup::members(&plan.cgroups_path, g.systemd_cgroup, &o.id);
    if in_use > 0 {
        return Err(LifecycleError::Invalid(format!(
            "cgroup {} is in use by {in_use} other process(es): each container needs its own",
            plan.cgroups_path
        )));
    }
    Ok(Checked {
        dir,
        bundle,
        plan,
        assets,
    })
}

/// After the container's VM is up, acting on the word its VMM left: a template it
/// refused (or could not restore) is moved aside; when the VM's shape has no template,
/// none is being made and none failed lately, a builder starts in the background. Later
/// containers of the shape restore it. A VM restored from its template left no word.
pub(super) fn template_after_vm(g: &Globals, plan: &Plan, assets: &Assets, dir: &StateDir) {
    let Some(store_dir) = g.templates_for(plan) else {
        return;
    };
    let Some(word) = TemplateWord::take(dir) else {
        return;
    };
    let store = crate::template::TemplateStore::new(store_dir);
    // The build lock: a template is moved aside or made by its holder alone (a builder
    // that holds it checks the template there itself).
    let lock = match store.ensure().and_then(|()| store.try_lock_builds()) {
        Ok(Some(lock)) => lock,
        Ok(None) => return,
        Err(e) => {
            log::warn!("templates: {e}");
            return;
        }
    };
    if let Some((dev, ino)) = word.refused {
        if let Err(e) = store.quarantine_if(&word.key, dev, ino) {
            log::warn!("templates: {e}");
        }
    }
    if store.path(&word.key).is_dir() || store.failed_recently(&word.key) {
        return;
    }
    log::debug!("making template {} in the background", word.key);
    let config = plan.vm_config(assets, vmm::ConsoleOutput::Sink);
    let flags = g.template_builder_args(assets);
    crate::template::build::spawn_background(&store, flags, &config, lock);
}

/// What the VMM said of its VM's template: its key, and which one it refused, if it did.
struct TemplateWord {
    key: String,
    refused: Option<(u64, u64)>,
}

impl TemplateWord {
    /// Reads and removes the word the VMM left, if any.
    fn take(dir: &StateDir) -> Option<Self> {
        let files = crate::state::files::TEMPLATE_REFUSED;
        let missing = crate::state::files::TEMPLATE_MISSING;
        let read = |name: &str| {
            let path = dir.file(name);
            let text = std::fs::read_to_string(&path).ok();
            let _ = std::fs::remove_file(&path);
            text
        };
        let (refused, missing) = (read(files), read(missing));
        let text = refused.as_deref().or(missing.as_deref())?;
        let mut first = text.lines().next()?.split(' ');
        // The VMM's word is checked: a key names a template's directory and nothing else.
        let key = first
            .next()
            .filter(|k| crate::template::is_key(k))?
            .to_string();
        let mut number = || first.next().and_then(|n| n.parse::<u64>().ok());
        let refused = match refused {
            Some(_) => Some((number()?, number()?)),
            None => None,
        };
        Some(TemplateWord { key, refused })
    }
}

/// Checks a network namespace path (one that is none fails here, before anything
/// exists). The runtime's own namespace (the host's, say) is no namespace of the
/// container's: joining it changes nothing, and its interfaces are never taken over.
fn own_network_is_none(plan: &mut Plan, id: &str) -> Result<(), LifecycleError> {
    if let Some(translate::VmmNamespace::Join(path)) = &plan.namespaces.network {
        let ns = crate::network::netns::Netns::open(path).map_err(|source| {
            crate::network::NetworkError::Netns {
                id: id.into(),
                source,
            }
        })?;
        if ns.is_own() {
            plan.namespaces.network = None;
        }
    }
    Ok(())
}

/// Creates the container: returns once its VM runs and its process waits for `start`.
pub fn create(g: &Globals, o: &CreateOptions) -> Result<(), LifecycleError> {
    let c = check(g, o, false)?;
    c.dir.create()?;
    let result = create_checked(g, o, &c);
    if result.is_err() {
        // The VMM is gone: what it joined or made goes too.
        crate::cgroup::remove(&c.plan.cgroups_path, g.systemd_cgroup, &o.id);
        let _ = c.dir.remove();
    }
    result
}

fn create_checked(g: &Globals, o: &CreateOptions, c: &Checked) -> Result<(), LifecycleError> {
    let _lock = c.dir.lock()?;
    let pid = spawn_vmm(g, o, &c.assets)?;
    template_after_vm(g, &c.plan, &c.assets, &c.dir);
    let mut container = record(c, pid, false)?;
    let json = container.state_json();
    let hooks = c.bundle.spec.hooks().as_ref();
    let done = [
        Phase::Prestart,
        Phase::CreateRuntime,
        Phase::CreateContainer,
    ]
    .into_iter()
    .try_for_each(|phase| hooks::run(hooks, phase, &json))
    .map_err(LifecycleError::from)
    .and_then(|()| match &o.pid_file {
        Some(p) => write_pid_file(p, pid),
        None => Ok(()),
    });
    let done = done
        .and_then(|()| note_network(&mut container))
        .and_then(|()| match container.status() {
            // The hooks ran, but the VM did not outlive them.
            Status::Stopped => Err(LifecycleError::Invalid(format!(
                "container {}: its VM ended while create ran",
                container.state.id
            ))),
            _ => Ok(()),
        });
    if done.is_err() {
        container.kill_vmm(KILL_TIMEOUT);
    }
    done
}

/// Records which interface the hooks left in the container's namespace, so that `start`
/// can tell one that vanished from one that never was.
fn note_network(c: &mut Container) -> Result<(), LifecycleError> {
    let (Some(pid), true) = (c.state.pid, c.state.network.own_namespace) else {
        return Ok(());
    };
    let Ok(ns) = crate::network::netns::Netns::of_pid(pid) else {
        return Ok(());
    };
    c.state.network.seen_at_create = crate::network::candidate(&c.state.id, &ns);
    if c.state.network.seen_at_create.is_some() {
        c.dir.save(&c.state)?;
    }
    Ok(())
}

/// Writes the pid file atomically, as runc does (no newline).
pub fn write_pid_file(path: &Path, pid: i32) -> Result<(), LifecycleError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()));
    std::fs::write(&tmp, pid.to_string()).map_err(io_err("writing pid file", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("writing pid file", path))
}

/// The VMM's command line: `runvm [globals] vmm-serve --ready-fd 3 [create options] ID`.
fn vmm_command(g: &Globals, o: &CreateOptions, assets: &Assets) -> Result<Command, LifecycleError> {
    let exe = std::env::current_exe().map_err(LifecycleError::Spawn)?;
    let mut cmd = Command::new(exe);
    let mut globals = g.clone();
    globals.kernel = Some(assets.kernel.clone());
    globals.initrd = Some(assets.initrd.clone());
    cmd.args(globals.to_args())
        .args(["vmm-serve", "--ready-fd", &READY_FD.to_string(), "--bundle"])
        .arg(&o.bundle);
    if let Some(s) = &o.console_socket {
        cmd.arg("--console-socket").arg(s);
        // With a terminal the container's stdio is the pty: the VMM must not keep the
        // caller's stdio, or a caller that reads `create`'s output until EOF (containerd's
        // shim does) would wait as long as the container lives. Its log goes to --log.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    if o.no_pivot {
        cmd.arg("--no-pivot");
    }
    cmd.arg(&o.id);
    Ok(cmd)
}

/// Starts the detached VMM and waits for its ready report; returns its pid.
fn spawn_vmm(g: &Globals, o: &CreateOptions, assets: &Assets) -> Result<i32, LifecycleError> {
    let (ready, ready_w) = ReadyReader::pipe().map_err(LifecycleError::Spawn)?;
    let raw = ready_w.as_raw_fd();
    let mut cmd = vmm_command(g, o, assets)?;
    // Descriptors the caller let runvm inherit are not the VMM's: none crosses exec.
    let child_setup = move || crate::util::detach_child(raw, READY_FD);
    // SAFETY: between fork and exec the hook only makes system calls on the child's own
    // session and descriptor table.
    unsafe { cmd.pre_exec(child_setup) };
    let mut child = cmd.spawn().map_err(LifecycleError::Spawn)?;
    drop(ready_w);
    match ready.wait() {
        Ok(()) => Ok(child.id() as i32),
        Err(e) => {
            // The VMM exits by itself after a failure report; never leave one behind.
            let _ = child.kill();
            let _ = child.wait();
            Err(e.into())
        }
    }
}

/// Records a created container whose VMM is `pid`.
pub(super) fn record(c: &Checked, pid: i32, started: bool) -> Result<Container, LifecycleError> {
    let (dir, bundle) = (&c.dir, &c.bundle);
    let annotations = bundle
        .spec
        .annotations()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let vmm_start_time = process_start_time(pid)
        .ok_or_else(|| LifecycleError::Invalid(format!("the VMM process {pid} is gone")))?;
    let state = State {
        oci_version: OCI_VERSION.into(),
        id: dir.id.clone(),
        status: Status::Created,
        pid: Some(pid),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        created: crate::logging::rfc3339_now(),
        owner: "root".into(),
        annotations,
        vmm_start_time,
        started,
        paused: false,
        cgroups_path: Some(c.plan.cgroups_path.clone()),
        memory_limit: c.plan.memory_limit,
        network: crate::network::NetworkState {
            own_namespace: c.plan.namespaces.network.is_some(),
            namespace_path: match &c.plan.namespaces.network {
                Some(crate::translate::VmmNamespace::Join(p)) => Some(p.clone()),
                _ => None,
            },
            seen_at_create: None,
            interface: None,
        },
    };
    dir.save(&state)?;
    Ok(Container {
        dir: dir.clone(),
        state,
    })
}

/// What the VMM process runs with, from the same arguments `create` had.
pub(super) fn supervisor_config(
    g: &Globals,
    o: &CreateOptions,
    c: Checked,
    own_tty: bool,
    auto_start: bool,
) -> SupervisorConfig {
    let templates = g.templates_for(&c.plan);
    SupervisorConfig {
        state: c.dir,
        plan: c.plan,
        assets: c.assets,
        console_socket: o.console_socket.clone(),
        own_tty,
        auto_start,
        systemd_cgroup: g.systemd_cgroup,
        seccomp: g.seccomp.mode(),
        // A detached VMM runs no hooks; in the foreground this process runs them after
        // the VM is up, with root's privileges.
        shed_privileges: !auto_start,
        templates,
    }
}

/// The VMM process of a created container (`runvm vmm-serve`): prepares the container,
/// reports on `ready_fd`, and serves it to its end; returns the exit status.
pub fn vmm_serve(g: &Globals, o: &CreateOptions, ready_fd: Option<i32>) -> i32 {
    // SAFETY: `create` passes the write end of its ready pipe as this descriptor, for
    // nothing else.
    let ready = ready_fd.map(|fd| unsafe { ReadyWriter::from_raw_fd(fd) });
    let fail = |ready: Option<ReadyWriter>, e: &(dyn std::error::Error + 'static)| {
        // `create` reports (and logs) it.
        if let Some(r) = ready {
            r.fail(&crate::logging::error_line(e));
        }
        1
    };
    let setup = StateDir::new(&g.root, &o.id)
        .map_err(LifecycleError::from)
        .and_then(|dir| {
            let bundle = Bundle::load(&o.bundle)?;
            let mut plan = translate::plan(&bundle, &o.id, o.no_pivot)?;
            own_network_is_none(&mut plan, &o.id)?;
            let assets = plan.assets(g.kernel.as_deref(), g.initrd.as_deref())?;
            Ok(Checked {
                dir,
                bundle,
                plan,
                assets,
            })
        });
    let cfg = match setup {
        Ok(c) => supervisor_config(g, o, c, false, false),
        Err(e) => return fail(ready, &e),
    };
    match supervisor::prepare(&cfg) {
        Ok(p) => supervisor::run(&cfg, p, ready),
        Err(e) => fail(ready, &e),
    }
}
