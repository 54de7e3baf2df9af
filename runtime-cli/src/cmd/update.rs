//! `runvm update`: changes the container's cgroup limits (CPU, pids). Guest memory cannot
//! change while the VM runs: a new memory limit is refused with an error.

use std::io::Read;

use anyhow::{anyhow, Context};
use runtime_cli::cgroup::Resources;
use runtime_cli::lifecycle;

use crate::cli::{Cli, UpdateArgs};

/// The limits `--resources` (OCI linux.resources JSON, "-" for stdin) and the flags ask for.
fn resources(a: &UpdateArgs) -> anyhow::Result<Resources> {
    let mut r = Resources::default();
    if let Some(path) = &a.resources {
        let mut text = String::new();
        if path.as_os_str() == "-" {
            std::io::stdin().read_to_string(&mut text)?;
        } else {
            text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
        }
        let res: oci_spec::runtime::LinuxResources =
            serde_json::from_str(&text).context("parsing resources")?;
        r = Resources::from_oci(&res);
    }
    if let Some(m) = &a.memory {
        r.memory_limit = Some(m.parse().map_err(|_| anyhow!("invalid --memory {m:?}"))?);
    }
    r.cpu_quota = a.cpu_quota.or(r.cpu_quota);
    r.cpu_period = a.cpu_period.or(r.cpu_period);
    r.pids_limit = a.pids_limit.or(r.pids_limit);
    Ok(r)
}

pub fn run(cli: &Cli, a: &UpdateArgs) -> anyhow::Result<()> {
    Ok(lifecycle::update(&cli.globals, &a.id, resources(a)?)?)
}
