//! `runvm pause` and `runvm resume`: stop and restart the container's vCPUs.

use anyhow::bail;
use runtime_cli::container::Container;
use runtime_cli::control::ControlRequest;
use runtime_cli::state::Status;

use crate::cli::{Cli, IdArg};

pub fn run(cli: &Cli, a: &IdArg, pause: bool) -> anyhow::Result<()> {
    let mut c = Container::load(&cli.root, &a.id)?;
    let _lock = c.dir.lock()?;
    c.state = c.dir.load()?;
    let status = c.status();
    let (want, request) = if pause {
        (Status::Running, ControlRequest::Pause)
    } else {
        (Status::Paused, ControlRequest::Resume)
    };
    if status != want {
        bail!("container {} is {status}, not {want}", a.id);
    }
    c.control(&request)?;
    c.state.paused = pause;
    c.dir.save(&c.state)?;
    Ok(())
}
