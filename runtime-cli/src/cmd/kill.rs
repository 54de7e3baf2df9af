//! `runvm kill`: sends a signal to the container's process (SIGKILL ends the VM).

use anyhow::{anyhow, bail};
use runtime_cli::container::{parse_signal, Container};
use runtime_cli::control::ControlRequest;
use runtime_cli::state::Status;

use crate::cli::{Cli, KillArgs};

pub fn run(cli: &Cli, a: &KillArgs) -> anyhow::Result<()> {
    let signal = parse_signal(&a.signal).map_err(|e| anyhow!(e))?;
    let c = Container::load(&cli.root, &a.id)?;
    let status = c.status();
    if matches!(status, Status::Stopped | Status::Creating) {
        bail!("container {} is not running (status {status})", a.id);
    }
    c.control(&ControlRequest::Kill { signal, all: a.all })?;
    Ok(())
}
