//! `runvm delete`: removes a stopped or created container (a running one with --force).

use runtime_cli::lifecycle;

use crate::cli::{Cli, DeleteArgs};

pub fn run(cli: &Cli, a: &DeleteArgs) -> anyhow::Result<()> {
    Ok(lifecycle::delete(&cli.globals, &a.id, a.force)?)
}
