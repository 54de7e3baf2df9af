//! The verbs on an existing container: `start`, `kill`, `delete`, `pause`/`resume` and
//! `update`. Each loads the container, checks its status as of now, and acts through the
//! VMM's control socket (or, where the VMM cannot answer, on its process directly).

use std::os::fd::AsFd;

use oci_spec::runtime::LinuxResources;

use crate::cgroup;
use crate::container::Container;
use crate::control::{ControlError, ControlRequest};
use crate::hooks::{self, Phase};
use crate::network::{self, netns::Netns, NetworkError};
use crate::state::{StateDir, Status};

use super::create::KILL_TIMEOUT;
use super::{Globals, LifecycleError};

/// Loads container `id`, which must have a live VMM (created, running or paused).
fn load_live(g: &Globals, id: &str) -> Result<Container, LifecycleError> {
    let c = Container::load(&g.root, id)?;
    let status = c.status();
    if matches!(status, Status::Stopped | Status::Creating) {
        return Err(LifecycleError::NotRunning {
            id: id.into(),
            status,
        });
    }
    Ok(c)
}

/// Lets a created container's process exec (startContainer and poststart hooks around).
pub fn start(g: &Globals, id: &str) -> Result<(), LifecycleError> {
    let mut c = Container::load(&g.root, id)?;
    let _lock = c.dir.lock()?;
    c.state = c.dir.load()?;
    let status = c.status();
    if status != Status::Created {
        return Err(LifecycleError::WrongState {
            verb: "start",
            id: id.into(),
            status,
        });
    }
    let hooks = c.hooks();
    if let Err(e) = hooks::run(hooks.as_ref(), Phase::StartContainer, &c.state_json()) {
        // A failed startContainer hook stops the container.
        c.kill_vmm(KILL_TIMEOUT);
        return Err(e.into());
    }
    if let Some(interface) = wire_network(&c)? {
        // Recorded at once, so that `delete` removes it whatever happens next.
        c.state.network.interface = Some(interface);
        c.dir.save(&c.state)?;
    }
    record_then(&mut c, |s| s.started = true, &ControlRequest::Start)?;
    hooks::run_warn(hooks.as_ref(), Phase::Poststart, &c.state_json());
    Ok(())
}

/// Takes over the container's network namespace for its VM (see `network`): the tap and
/// the interface's configuration go to the VMM. Returns the interface wired.
fn wire_network(c: &Container) -> Result<Option<String>, LifecycleError> {
    let id = &c.state.id;
    if !c.state.network.own_namespace {
        network::warn_no_namespace(id);
        return Ok(None);
    }
    let pid = c
        .state
        .pid
        .ok_or_else(|| LifecycleError::Invalid(format!("container {id} has no VMM")))?;
    let ns = Netns::of_pid(pid).map_err(|source| NetworkError::Netns {
        id: id.clone(),
        source,
    })?;
    if ns.is_own() {
        // Never the runtime's own (the host's) interfaces.
        network::warn_no_namespace(id);
        return Ok(None);
    }
    let expected = c.state.network.seen_at_create.as_deref();
    let wired = network::take_over(id, &ns, expected, |t| {
        let request = ControlRequest::Network { config: t.config };
        c.control_with_fd(&request, t.tap.as_fd())
            .map(drop)
            .map_err(|e| e.to_string())
    })?;
    Ok(wired)
}

/// Removes what the takeover left in a network namespace that outlives the VM.
fn release_network(c: &Container) {
    let n = &c.state.network;
    if let (Some(path), Some(interface)) = (&n.namespace_path, &n.interface) {
        match Netns::open(path) {
            Ok(ns) if ns.is_own() => {}
            Ok(ns) => network::release(&c.state.id, &ns, interface),
            Err(e) => log::debug!("container {}: {e}", c.state.id),
        }
    }
}

/// Sends `signal` to the container's process (to all its processes with `all`). A VMM
/// that does not answer on its control socket (still booting, or stuck) gets the signal
/// itself: it stands for the container's process, and SIGKILL ends it for sure.
pub fn kill(g: &Globals, id: &str, signal: i32, all: bool) -> Result<(), LifecycleError> {
    let c = load_live(g, id)?;
    match c.control(&ControlRequest::Kill { signal, all }) {
        Ok(_) => Ok(()),
        Err(ControlError::Unreachable(why)) => {
            log::debug!("container {id}: control socket: {why}; signalling the VMM");
            if signal == libc::SIGKILL {
                if c.kill_vmm(KILL_TIMEOUT) {
                    return Ok(());
                }
                return Err(LifecycleError::VmmStuck(id.into()));
            }
            c.signal_vmm(signal)
                .map_err(|e| LifecycleError::Invalid(format!("signalling container {id}: {e}")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Deletes a stopped or created container (a running one with `force`): its VMM, its
/// cgroup, its state; then the poststop hooks. With `force`, a container that does not
/// exist (or a half-created directory) is not an error, as with runc.
pub fn delete(g: &Globals, id: &str, force: bool) -> Result<(), LifecycleError> {
    let c = match Container::load(&g.root, id) {
        Ok(c) => c,
        Err(e) => {
            let dir = StateDir::new(&g.root, id)?;
            if force {
                if dir.dir.exists() {
                    dir.remove()?;
                }
                return Ok(());
            }
            return Err(e.into());
        }
    };
    let _lock = c.dir.lock()?;
    let status = c.status();
    if matches!(status, Status::Running | Status::Paused) && !force {
        return Err(LifecycleError::DeleteRunning {
            id: id.into(),
            status,
        });
    }
    if status != Status::Stopped && !c.kill_vmm(KILL_TIMEOUT) {
        return Err(LifecycleError::VmmStuck(id.into()));
    }
    let hooks = c.hooks();
    release_network(&c);
    if let Some(path) = c.cgroups_path() {
        cgroup::remove(&path, g.systemd_cgroup, id);
    }
    let json = c.state_json();
    c.dir.remove()?;
    hooks::run_warn(hooks.as_ref(), Phase::Poststop, &json);
    Ok(())
}

/// Pauses (`true`) or resumes (`false`) the container's vCPUs.
pub fn set_paused(g: &Globals, id: &str, pause: bool) -> Result<(), LifecycleError> {
    let mut c = Container::load(&g.root, id)?;
    let _lock = c.dir.lock()?;
    c.state = c.dir.load()?;
    let status = c.status();
    let (want, request, verb) = if pause {
        (Status::Running, ControlRequest::Pause, "pause")
    } else {
        (Status::Paused, ControlRequest::Resume, "resume")
    };
    if status != want {
        return Err(LifecycleError::WrongState {
            verb,
            id: id.into(),
            status,
        });
    }
    record_then(&mut c, |s| s.paused = pause, &request)?;
    Ok(())
}

/// Records a change of state, then asks the VMM for it; takes the record back if the VMM
/// refuses. A state that cannot be written (a full file system) changes nothing, so the
/// recorded state never lags behind the container's.
fn record_then(
    c: &mut Container,
    change: impl Fn(&mut crate::state::State),
    request: &ControlRequest,
) -> Result<(), LifecycleError> {
    let before = c.state.clone();
    change(&mut c.state);
    c.dir.save(&c.state)?;
    if let Err(e) = c.control(request) {
        c.state = before;
        if let Err(undo) = c.dir.save(&c.state) {
            log::warn!("container {}: restoring its state: {undo}", c.state.id);
        }
        return Err(e.into());
    }
    Ok(())
}

/// Changes the container's cgroup limits (CPU, pids). Guest memory cannot change while
/// the VM runs: a different memory limit is refused.
pub fn update(
    g: &Globals,
    id: &str,
    memory_limit: Option<i64>,
    r: &LinuxResources,
) -> Result<(), LifecycleError> {
    let c = load_live(g, id)?;
    let Some(path) = c.cgroups_path() else {
        return Err(LifecycleError::Invalid(format!(
            "container {id} has no cgroupsPath to update"
        )));
    };
    let current = c.state.memory_limit;
    if memory_limit.is_some_and(|m| m > 0) && memory_limit != current {
        return Err(LifecycleError::Invalid(format!(
            "guest memory cannot change while the VM runs (memory limit stays {current:?})"
        )));
    }
    cgroup::update(&path, r, g.systemd_cgroup, id)?;
    Ok(())
}
