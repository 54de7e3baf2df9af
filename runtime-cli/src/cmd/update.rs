//! `runvm update`: changes the container's cgroup limits (CPU, pids). Guest memory cannot
//! change while the VM runs: a new memory limit is refused with an error.

use std::io::Read;

use anyhow::{anyhow, bail, Context};
use runtime_cli::cgroup::Resources;
use runtime_cli::container::Container;
use runtime_cli::state::Status;

use crate::cli::{Cli, UpdateArgs};

pub fn run(cli: &Cli, a: &UpdateArgs) -> anyhow::Result<()> {
    let c = Container::load(&cli.root, &a.id)?;
    if matches!(c.status(), Status::Stopped | Status::Creating) {
        bail!("container {} is not running", a.id);
    }
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
        r.memory_limit = res.memory().as_ref().and_then(|m| m.limit());
        r.cpu_quota = res.cpu().as_ref().and_then(|c| c.quota());
        r.cpu_period = res.cpu().as_ref().and_then(|c| c.period());
        r.cpu_shares = res.cpu().as_ref().and_then(|c| c.shares());
        r.pids_limit = res.pids().as_ref().map(|p| p.limit());
    }
    if let Some(m) = &a.memory {
        r.memory_limit = Some(m.parse().map_err(|_| anyhow!("invalid --memory {m:?}"))?);
    }
    r.cpu_quota = a.cpu_quota.or(r.cpu_quota);
    r.cpu_period = a.cpu_period.or(r.cpu_period);
    r.pids_limit = a.pids_limit.or(r.pids_limit);
    let spec = oci_spec::runtime::Spec::load(c.state.bundle.join("config.json"))
        .context("reading the bundle's config")?;
    let current = spec.linux().as_ref().and_then(|l| {
        l.resources()
            .as_ref()
            .and_then(|r| r.memory().as_ref().and_then(|m| m.limit()))
    });
    if r.memory_limit.is_some_and(|m| m > 0) && r.memory_limit != current {
        bail!("guest memory cannot change while the VM runs (memory limit stays {current:?})");
    }
    let Some(path) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) else {
        bail!("container {} has no cgroupsPath to update", a.id);
    };
    // Moving the VMM again applies the limits to its cgroup.
    r.memory_limit = None;
    let pid = c.state.pid.unwrap_or(0) as u32;
    runtime_cli::cgroup::apply_to(&path.to_string_lossy(), &r, cli.systemd_cgroup, pid)?;
    Ok(())
}
