//! `runvm ps`: the container's processes. The table lists them as the guest numbers them
//! (they live in the VM); `--format json` lists the host processes that make up the
//! container — its VMM and the proxies of running `exec`s — which is what callers that
//! match pids against the host's process table (`docker top`) need.

use anyhow::bail;
use runtime_cli::container::Container;
use runtime_cli::control::{ControlRequest, ControlResponse};
use runtime_cli::state::{files, Status};

use crate::cli::{Cli, Format, PsArgs};

/// The VMM pid and the live exec proxies registered under the state directory.
fn host_pids(c: &Container) -> Vec<i32> {
    let mut pids: Vec<i32> = c.state.pid.into_iter().collect();
    if let Ok(entries) = std::fs::read_dir(c.dir.file(files::EXECS)) {
        let mut execs: Vec<i32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect();
        execs.sort_unstable();
        pids.extend(execs);
    }
    pids
}

pub fn run(cli: &Cli, a: &PsArgs) -> anyhow::Result<()> {
    let c = Container::load(&cli.root, &a.id)?;
    if matches!(c.status(), Status::Stopped | Status::Creating) {
        bail!("container {} is not running", a.id);
    }
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&host_pids(&c))?),
        Format::Table => {
            let pids = match c.control(&ControlRequest::Pids)? {
                ControlResponse::Pids { pids } => pids,
                other => bail!("unexpected answer {other:?}"),
            };
            println!("PID (in the VM)");
            for p in pids {
                println!("{p}");
            }
        }
    }
    Ok(())
}
