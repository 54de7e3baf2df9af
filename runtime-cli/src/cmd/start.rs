//! `runvm start`: lets a created container's process exec.

use runtime_cli::lifecycle;

use crate::cli::{Cli, IdArg};

pub fn run(cli: &Cli, a: &IdArg) -> anyhow::Result<()> {
    Ok(lifecycle::start(&cli.globals, &a.id)?)
}
