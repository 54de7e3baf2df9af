//! `runvm delete`: removes a stopped or created container (a running one with --force),
//! its VMM, cgroup and state, then runs the poststop hooks.

use std::time::Duration;

use anyhow::bail;
use runtime_cli::container::Container;
use runtime_cli::hooks::{self, Phase};
use runtime_cli::state::Status;

use crate::cli::{Cli, DeleteArgs};

pub fn run(cli: &Cli, a: &DeleteArgs) -> anyhow::Result<()> {
    let c = match Container::load(&cli.root, &a.id) {
        Ok(c) => c,
        Err(e) => {
            // With --force, as runc: a half-created directory (no state yet) goes, and a
            // container that does not exist is not an error (shims clean up with it).
            let dir = runtime_cli::state::StateDir::new(&cli.root, &a.id)?;
            if a.force {
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
    if matches!(status, Status::Running | Status::Paused) && !a.force {
        bail!(
            "cannot delete container {} in status {status}: stop it first or use --force",
            a.id
        );
    }
    if status != Status::Stopped && !c.kill_vmm(Duration::from_secs(10)) {
        bail!("the VMM of container {} did not end", a.id);
    }
    let hooks = c.hooks();
    if let Ok(spec) = oci_spec::runtime::Spec::load(c.state.bundle.join("config.json")) {
        if let Some(path) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
            runtime_cli::cgroup::remove(&path.to_string_lossy(), cli.systemd_cgroup);
        }
    }
    let json = c.state_json();
    c.dir.remove()?;
    hooks::run_warn(hooks.as_ref(), Phase::Poststop, &json);
    Ok(())
}
