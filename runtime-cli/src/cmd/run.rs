//! `runvm run`: create and start in one go; in the foreground, exits with the container's
//! status.

use runtime_cli::lifecycle;

use crate::cli::{Cli, RunArgs};

pub fn run(cli: &Cli, a: &RunArgs) -> anyhow::Result<i32> {
    if a.detach {
        lifecycle::run_detached(&cli.globals, &a.create)?;
        return Ok(0);
    }
    Ok(lifecycle::run_foreground(&cli.globals, &a.create, a.keep)?)
}
