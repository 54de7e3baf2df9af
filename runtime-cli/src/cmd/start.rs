//! `runvm start`: lets a created container's process exec.

use anyhow::bail;
use runtime_cli::container::Container;
use runtime_cli::control::ControlRequest;
use runtime_cli::hooks::{self, Phase};
use runtime_cli::state::Status;

use crate::cli::{Cli, IdArg};

pub fn run(cli: &Cli, a: &IdArg) -> anyhow::Result<()> {
    let mut c = Container::load(&cli.root, &a.id)?;
    let _lock = c.dir.lock()?;
    c.state = c.dir.load()?;
    let status = c.status();
    if status != Status::Created {
        bail!("cannot start container {} in status {status}", a.id);
    }
    let hooks = c.hooks();
    if let Err(e) = hooks::run(hooks.as_ref(), Phase::StartContainer, &c.state_json()) {
        // A failed startContainer hook stops the container.
        c.kill_vmm(std::time::Duration::from_secs(10));
        return Err(e.into());
    }
    c.control(&ControlRequest::Start)?;
    c.state.started = true;
    c.dir.save(&c.state)?;
    hooks::run_warn(hooks.as_ref(), Phase::Poststart, &c.state_json());
    Ok(())
}
