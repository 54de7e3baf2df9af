//! The VMM process's cgroup: the host accounts and limits the VM as the container. The
//! cgroups themselves are youki's `libcgroups` (cgroup v1, the v1/v2 hybrid layout, v2,
//! and systemd's transient units with `--systemd-cgroup`); this module decides what the
//! VMM's cgroup gets:
//!
//! - every limit of `linux.resources` but `devices` (the guest's device nodes are what its
//!   processes can reach; the VMM itself needs /dev/kvm and /dev/net/tun);
//! - a memory limit always: the guest's RAM plus [`VMM_MEMORY_OVERHEAD`];
//! - the limits the spec leaves unset reset to the kernel's defaults (no quota, default
//!   shares, no pids limit, the root's cpus and memory nodes), so a cgroup that an earlier
//!   container left behind keeps none of its limits.

use std::path::{Path, PathBuf};

use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, AnyManagerError, CgroupConfig, CgroupManager,
    ControllerOpt, CreateCgroupSetupError,
};
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};

/// Bytes the VMM process may use beyond the guest's RAM before its cgroup limit hits: its
/// own memory (device buffers, the virtio-fs backend, thread stacks). The measured peak
/// RSS of the VMM itself is ~24 MiB (docs/BENCHMARKS.md).
pub const VMM_MEMORY_OVERHEAD: i64 = 64 << 20;
/// cpu.shares the kernel gives a new cgroup.
const DEFAULT_SHARES: u64 = 1024;
/// cpu.cfs_period_us the kernel gives a new cgroup.
const DEFAULT_PERIOD: u64 = 100_000;

/// Errors with the container's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Manager {
        path: String,
        #[source]
        source: Box<CreateCgroupSetupError>,
    },
    #[error("cgroup {path}: {source}")]
    Apply {
        path: String,
        #[source]
        source: Box<AnyManagerError>,
    },
    #[error("cgroup {path}: resources: {reason}")]
    Resources { path: String, reason: String },
}

/// The cgroups path of a container whose spec names none (runc uses the id as well).
pub fn default_path(id: &str) -> String {
    format!("/runvm-{id}")
}

fn manager(path: &str, systemd: bool, id: &str) -> Result<AnyCgroupManager, CgroupError> {
    let config = CgroupConfig {
        cgroup_path: PathBuf::from(path),
        systemd_cgroup: systemd,
        container_name: id.to_string(),
    };
    create_cgroup_manager(config).map_err(|source| CgroupError::Manager {
        path: path.into(),
        source: Box::new(source),
    })
}

fn this_pid() -> nix_cgroups::unistd::Pid {
    nix_cgroups::unistd::Pid::from_raw(std::process::id() as i32)
}

/// The cpus and memory nodes a cgroup gets when the spec names none: the root's.
fn root_cpuset() -> (Option<String>, Option<String>) {
    let read = |dir: &str, file: &str| {
        std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(dir).join(file))
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let v1 = (read("cpuset", "cpuset.cpus"), read("cpuset", "cpuset.mems"));
    if v1.0.is_some() {
        return v1;
    }
    (
        read("", "cpuset.cpus.effective"),
        read("", "cpuset.mems.effective"),
    )
}

/// What the VMM's cgroup gets for a spec's `linux.resources` and a guest of `guest_bytes`.
pub fn host_resources(
    spec: Option<&LinuxResources>,
    guest_bytes: i64,
) -> Result<LinuxResources, String> {
    let mut r = spec.cloned().unwrap_or_default();
    r.set_devices(None);
    let memory = (*r.memory()).unwrap_or_default();
    let mut mem = LinuxMemoryBuilder::default().limit(guest_bytes + VMM_MEMORY_OVERHEAD);
    if let Some(swap) = memory.swap() {
        // memory.memsw counts memory and swap together.
        mem = mem.swap(if swap > 0 {
            swap + VMM_MEMORY_OVERHEAD
        } else {
            swap
        });
    }
    if let Some(s) = memory.swappiness() {
        mem = mem.swappiness(s);
    }
    if let Some(s) = memory.reservation() {
        mem = mem.reservation(s);
    }
    r.set_memory(Some(mem.build().map_err(|e| e.to_string())?));
    let cpu = r.cpu().clone().unwrap_or_default();
    let (root_cpus, root_mems) = root_cpuset();
    let mut c = LinuxCpuBuilder::default()
        .shares(cpu.shares().unwrap_or(DEFAULT_SHARES))
        .quota(cpu.quota().unwrap_or(-1))
        .period(cpu.period().unwrap_or(DEFAULT_PERIOD));
    if let Some(cpus) = cpu.cpus().clone().or(root_cpus) {
        c = c.cpus(cpus);
    }
    if let Some(mems) = cpu.mems().clone().or(root_mems) {
        c = c.mems(mems);
    }
    if let Some(v) = cpu.realtime_runtime() {
        c = c.realtime_runtime(v);
    }
    if let Some(v) = cpu.realtime_period() {
        c = c.realtime_period(v);
    }
    r.set_cpu(Some(c.build().map_err(|e| e.to_string())?));
    let pids = r.pids().as_ref().map_or(0, |p| p.limit());
    r.set_pids(Some(
        LinuxPidsBuilder::default()
            .limit(pids)
            .build()
            .map_err(|e| e.to_string())?,
    ));
    Ok(r)
}

fn apply_err(path: &str) -> impl FnOnce(AnyManagerError) -> CgroupError + '_ {
    move |source| CgroupError::Apply {
        path: path.into(),
        source: Box::new(source),
    }
}

/// Moves the calling process into cgroup `path` and gives it `resources` (see
/// [`host_resources`]).
pub fn join(
    path: &str,
    resources: &LinuxResources,
    systemd: bool,
    id: &str,
) -> Result<(), CgroupError> {
    let m = manager(path, systemd, id)?;
    m.add_task(this_pid()).map_err(apply_err(path))?;
    apply(&m, path, resources)
}

/// Changes the limits of cgroup `path` to those set in `resources` (`update`).
pub fn update(
    path: &str,
    resources: &LinuxResources,
    systemd: bool,
    id: &str,
) -> Result<(), CgroupError> {
    apply(&manager(path, systemd, id)?, path, resources)
}

fn apply(m: &AnyCgroupManager, path: &str, resources: &LinuxResources) -> Result<(), CgroupError> {
    let opt = ControllerOpt {
        resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    };
    m.apply(&opt).map_err(apply_err(path))
}

/// Where the calling process is in each cgroup hierarchy (`/proc/self/cgroup`), to go
/// back there: a foreground `run` is its container's VMM, then must leave the container's
/// cgroup to remove it.
#[derive(Clone, Debug, Default)]
pub struct Membership(Vec<PathBuf>);

impl Membership {
    /// The `cgroup.procs` file of each cgroup the calling process is in.
    pub fn current() -> Self {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let files = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                let mount = match controllers {
                    // v2: the unified hierarchy, at the top or beside v1 ones (hybrid).
                    "" if Path::new("/sys/fs/cgroup/unified").is_dir() => "unified".to_string(),
                    "" => String::new(),
                    c => c.trim_start_matches("name=").to_string(),
                };
                let dir = Path::new("/sys/fs/cgroup").join(mount);
                Some(dir.join(path.trim_start_matches('/')).join("cgroup.procs"))
            })
            .filter(|f| f.exists())
            .collect();
        Membership(files)
    }

    /// Moves the calling process back into these cgroups; errors are logged.
    pub fn restore(&self) {
        let pid = std::process::id().to_string();
        for procs in &self.0 {
            if let Err(e) = std::fs::write(procs, &pid) {
                log::debug!("returning to {}: {e}", procs.display());
            }
        }
    }
}

/// How many processes cgroup `path` has now (none when it does not exist). A container
/// never joins a cgroup another one uses: removing it at the end would end the other.
pub fn members(path: &str, systemd: bool, id: &str) -> usize {
    manager(path, systemd, id)
        .ok()
        .and_then(|m| m.get_all_pids().ok())
        .map_or(0, |pids| pids.len())
}

/// Removes the container's cgroup (its processes are gone); errors are logged.
pub fn remove(path: &str, systemd: bool, id: &str) {
    let removed = manager(path, systemd, id).and_then(|m| m.remove().map_err(apply_err(path)));
    if let Err(e) = removed {
        log::debug!("removing cgroup {path}: {e}");
    }
}

/// Limits for `update`: a CPU and pids subset of OCI `linux.resources`.
pub fn update_resources(
    quota: Option<i64>,
    period: Option<u64>,
    shares: Option<u64>,
    pids: Option<i64>,
) -> Result<LinuxResources, String> {
    let mut cpu = LinuxCpuBuilder::default();
    if let Some(q) = quota {
        cpu = cpu.quota(q);
    }
    if let Some(p) = period {
        cpu = cpu.period(p);
    }
    if let Some(s) = shares {
        cpu = cpu.shares(s);
    }
    let mut r = LinuxResourcesBuilder::default().cpu(cpu.build().map_err(|e| e.to_string())?);
    if let Some(p) = pids {
        r = r.pids(
            LinuxPidsBuilder::default()
                .limit(p)
                .build()
                .map_err(|e| e.to_string())?,
        );
    }
    r.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_names_the_cgroups_this_process_is_in() {
        let m = Membership::current();
        assert!(!m.0.is_empty(), "no cgroup found for this process");
        let pid = std::process::id().to_string();
        for procs in &m.0 {
            let members = std::fs::read_to_string(procs).unwrap();
            assert!(
                members.lines().any(|l| l == pid),
                "{} lacks {pid}",
                procs.display()
            );
        }
        m.restore();
        assert_eq!(
            Membership::current().0,
            m.0,
            "restoring where it is moves nothing"
        );
    }

    #[test]
    fn the_vmm_gets_the_guest_memory_and_reset_defaults_but_no_device_rules() {
        let spec: LinuxResources = serde_json::from_value(serde_json::json!({
            "devices": [{"allow": false, "access": "rwm"}],
            "cpu": {"cpus": "0"},
            "pids": {"limit": 50}
        }))
        .unwrap();
        let r = host_resources(Some(&spec), 256 << 20).unwrap();
        assert!(r.devices().is_none());
        let mem = (*r.memory()).unwrap();
        assert_eq!(mem.limit(), Some((256 << 20) + VMM_MEMORY_OVERHEAD));
        let cpu = r.cpu().clone().unwrap();
        assert_eq!(cpu.cpus().as_deref(), Some("0"));
        assert_eq!(
            (cpu.quota(), cpu.shares()),
            (Some(-1), Some(DEFAULT_SHARES))
        );
        assert_eq!(r.pids().as_ref().unwrap().limit(), 50);
        // No spec at all: still a memory limit, and no pids limit.
        let r = host_resources(None, 128 << 20).unwrap();
        assert_eq!(
            r.memory().as_ref().unwrap().limit(),
            Some((128 << 20) + VMM_MEMORY_OVERHEAD)
        );
        assert_eq!(r.pids().as_ref().unwrap().limit(), 0);
    }
}
