//! `runvm ps`: the container's processes. The table lists them as the guest numbers them
//! (they live in the VM); `--format json` lists the host processes that make up the
//! container — its VMM and the proxies of running `exec`s — which is what callers that
//! match pids against the host's process table (`docker top`) need.

use anyhow::bail;
use runtime_cli::container::Container;
use runtime_cli::state::Status;

use crate::cli::{Cli, Format, PsArgs};

pub fn run(cli: &Cli, a: &PsArgs) -> anyhow::Result<()> {
    let c = Container::load(&cli.globals.root, &a.id)?;
    if matches!(c.status(), Status::Stopped | Status::Creating) {
        bail!("container {} is not running", a.id);
    }
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&c.host_pids())?),
        Format::Table => {
            println!("PID (in the VM)");
            for p in c.guest_pids()? {
                println!("{p}");
            }
        }
    }
    Ok(())
}
