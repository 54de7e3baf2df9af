//! `runvm state`: prints the OCI state, with the status as of now.

use runtime_cli::container::Container;

use crate::cli::{Cli, IdArg};

pub fn run(cli: &Cli, a: &IdArg) -> anyhow::Result<()> {
    let c = Container::load(&cli.globals.root, &a.id)?;
    println!("{}", serde_json::to_string_pretty(&c.state.to_output())?);
    Ok(())
}
