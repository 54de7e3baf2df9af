//! `runvm pause` and `runvm resume`: stop and restart the container's vCPUs.

use runtime_cli::lifecycle;

use crate::cli::{Cli, IdArg};

pub fn run(cli: &Cli, a: &IdArg, pause: bool) -> anyhow::Result<()> {
    Ok(lifecycle::set_paused(&cli.globals, &a.id, pause)?)
}
