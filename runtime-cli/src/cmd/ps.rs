//! `runvm ps`: the container's processes. Their pids are the guest's: the processes live
//! in the VM, and on the host the container is its VMM process.

use anyhow::bail;
use runtime_cli::container::Container;
use runtime_cli::control::{ControlRequest, ControlResponse};
use runtime_cli::state::Status;

use crate::cli::{Cli, Format, PsArgs};

pub fn run(cli: &Cli, a: &PsArgs) -> anyhow::Result<()> {
    let c = Container::load(&cli.root, &a.id)?;
    if matches!(c.status(), Status::Stopped | Status::Creating) {
        bail!("container {} is not running", a.id);
    }
    let pids = match c.control(&ControlRequest::Pids)? {
        ControlResponse::Pids { pids } => pids,
        other => bail!("unexpected answer {other:?}"),
    };
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&pids)?),
        Format::Table => {
            println!("PID");
            for p in pids {
                println!("{p}");
            }
        }
    }
    Ok(())
}
