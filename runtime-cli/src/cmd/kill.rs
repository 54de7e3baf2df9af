//! `runvm kill`: sends a signal to the container's process (SIGKILL ends the VM).

use anyhow::anyhow;
use runtime_cli::container::parse_signal;
use runtime_cli::lifecycle;

use crate::cli::{Cli, KillArgs};

pub fn run(cli: &Cli, a: &KillArgs) -> anyhow::Result<()> {
    let signal = parse_signal(&a.signal).map_err(|e| anyhow!(e))?;
    Ok(lifecycle::kill(&cli.globals, &a.id, signal, a.all)?)
}
