//! `runvm exec`: runs another process in a running container; exits with its status.

use runtime_cli::exec::{self, ExecOptions};

use crate::cli::Cli;

pub fn run(cli: &Cli, a: &ExecOptions) -> anyhow::Result<i32> {
    Ok(exec::exec(&cli.globals, a)?)
}
