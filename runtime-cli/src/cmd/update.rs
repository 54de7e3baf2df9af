//! `runvm update`: changes the container's cgroup limits (CPU, pids). Guest memory cannot
//! change while the VM runs: a new memory limit is refused with an error.

use std::io::Read;

use anyhow::{anyhow, Context};
use runtime_cli::{cgroup, lifecycle};

use crate::cli::{Cli, UpdateArgs};

pub fn run(cli: &Cli, a: &UpdateArgs) -> anyhow::Result<()> {
    let mut from_file = None;
    if let Some(path) = &a.resources {
        let mut text = String::new();
        if path.as_os_str() == "-" {
            std::io::stdin().read_to_string(&mut text)?;
        } else {
            text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
        }
        let r: oci_spec::runtime::LinuxResources =
            serde_json::from_str(&text).context("parsing resources")?;
        from_file = Some(r);
    }
    let cpu = from_file.as_ref().and_then(|r| r.cpu().clone());
    let memory = match &a.memory {
        Some(m) => Some(m.parse().map_err(|_| anyhow!("invalid --memory {m:?}"))?),
        None => from_file
            .as_ref()
            .and_then(|r| r.memory().as_ref().and_then(|m| m.limit())),
    };
    let r = cgroup::update_resources(
        a.cpu_quota.or(cpu.as_ref().and_then(|c| c.quota())),
        a.cpu_period.or(cpu.as_ref().and_then(|c| c.period())),
        cpu.as_ref().and_then(|c| c.shares()),
        a.pids_limit.or(from_file
            .as_ref()
            .and_then(|r| r.pids().as_ref().map(|p| p.limit()))),
    )
    .map_err(|e| anyhow!("resources: {e}"))?;
    Ok(lifecycle::update(&cli.globals, &a.id, memory, &r)?)
}
