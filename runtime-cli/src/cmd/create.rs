//! `runvm create`: boots the container's VM in a detached VMM process and returns once the
//! container's process is prepared and waiting for `start`.

use runtime_cli::lifecycle::{self, CreateOptions};

use crate::cli::Cli;

pub fn run(cli: &Cli, a: &CreateOptions) -> anyhow::Result<()> {
    Ok(lifecycle::create(&cli.globals, a)?)
}
