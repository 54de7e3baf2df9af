//! `run`: create and start in one go. Detached, it composes `create` and `start` (and a
//! forced `delete` if the start fails). In the foreground this process is the container's
//! VMM: it exits with the container's status and removes the container unless `keep`.

use std::io::IsTerminal;

use crate::hooks::{self, Phase};
use crate::supervisor;

use super::create::{record, supervisor_config};
use super::{check, create, delete, start, write_pid_file, CreateOptions, Globals};
use super::{Checked, LifecycleError};

/// Creates and starts the container, leaving it running.
pub fn run_detached(g: &Globals, o: &CreateOptions) -> Result<(), LifecycleError> {
    create(g, o)?;
    if let Err(e) = start(g, &o.id) {
        let _ = delete(g, &o.id, true);
        return Err(e);
    }
    Ok(())
}

/// Runs the container with this process as its VMM; returns the container's status.
pub fn run_foreground(g: &Globals, o: &CreateOptions, keep: bool) -> Result<i32, LifecycleError> {
    // The state below says "running" as soon as it is saved: from then on a signal must
    // reach the container (the supervisor's signal thread takes them), not end this
    // process by its default action.
    crate::relay::block_forwarded()
        .map_err(|e| LifecycleError::Supervisor(supervisor::SupervisorError::Signals(e)))?;
    // In the foreground a terminal can be the caller's own.
    let own_tty = o.console_socket.is_none() && std::io::stdin().is_terminal();
    let c = check(g, o, own_tty)?;
    c.dir.create()?;
    let dir = c.dir.clone();
    let (plan, assets) = (c.plan.clone(), c.assets.clone());
    let cgroup = c.plan.cgroups_path.clone();
    let before = crate::cgroup::Membership::current();
    let result = foreground(g, o, c, own_tty, keep);
    // This process was the VMM: back out of the container's cgroup, which goes with the
    // container (or with `delete` when it is kept).
    before.restore();
    // Out of the container's cgroup, a template builder this starts outlives it.
    super::create::template_after_vm(g, &plan, &assets, &dir);
    if !keep || result.is_err() {
        crate::cgroup::remove(&cgroup, g.systemd_cgroup, &o.id);
        let _ = dir.remove();
    }
    result
}

fn foreground(
    g: &Globals,
    o: &CreateOptions,
    c: Checked,
    own_tty: bool,
    keep: bool,
) -> Result<i32, LifecycleError> {
    let me = std::process::id() as i32;
    let container = record(&c, me, true)?;
    let hooks = c.bundle.spec.hooks().clone();
    let own_tty = own_tty && c.plan.process.terminal;
    let cfg = supervisor_config(g, o, c, own_tty, true);
    let prepared = supervisor::prepare(&cfg)?;
    let json = container.state_json();
    let hooked = [
        Phase::Prestart,
        Phase::CreateRuntime,
        Phase::CreateContainer,
        Phase::StartContainer,
    ]
    .into_iter()
    .try_for_each(|phase| hooks::run(hooks.as_ref(), phase, &json))
    .map_err(LifecycleError::from)
    .and_then(|()| match &o.pid_file {
        Some(p) => write_pid_file(p, me),
        None => Ok(()),
    });
    if let Err(e) = hooked {
        prepared.abort();
        return Err(e);
    }
    hooks::run_warn(hooks.as_ref(), Phase::Poststart, &json);
    let status = supervisor::run(&cfg, prepared, None);
    if !keep {
        hooks::run_warn(hooks.as_ref(), Phase::Poststop, &json);
    }
    Ok(status)
}
