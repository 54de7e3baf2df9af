//! The VMM process joins the container's cgroup (`linux.cgroupsPath`) with its memory,
//! CPU and pids limits, so the host accounts and limits the VM as the container. Handles
//! cgroup v2, v1 and the v1/v2 hybrid layout (controllers in v1); systemd-style paths
//! (`slice:prefix:name`) become `<slice>/<prefix>-<name>.scope` under the hierarchy.

use std::path::{Path, PathBuf};

/// Limits taken from `linux.resources`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory_limit: Option<i64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpu_shares: Option<u64>,
    pub pids_limit: Option<i64>,
}

impl Resources {
    /// The limits of an OCI `linux.resources` as they are.
    pub fn from_oci(r: &oci_spec::runtime::LinuxResources) -> Self {
        let cpu = r.cpu().as_ref();
        Resources {
            memory_limit: r.memory().as_ref().and_then(|m| m.limit()),
            cpu_quota: cpu.and_then(|c| c.quota()),
            cpu_period: cpu.and_then(|c| c.period()),
            cpu_shares: cpu.and_then(|c| c.shares()),
            pids_limit: r.pids().as_ref().map(|p| p.limit()),
        }
    }
}

/// Errors joining the cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup path {0:?} is not valid")]
    BadPath(String),
}

const MOUNT: &str = "/sys/fs/cgroup";

/// Turns an OCI cgroupsPath into a path relative to a hierarchy's root.
pub fn relative_path(cgroups_path: &str, systemd: bool) -> Result<PathBuf, CgroupError> {
    if systemd || (cgroups_path.matches(':').count() == 2 && !cgroups_path.starts_with('/')) {
        let parts: Vec<&str> = cgroups_path.split(':').collect();
        let [slice, prefix, name] = parts.as_slice() else {
            return Err(CgroupError::BadPath(cgroups_path.into()));
        };
        let slice = if slice.is_empty() {
            "system.slice"
        } else {
            slice
        };
        let unit = if name.ends_with(".slice") || name.ends_with(".scope") {
            name.to_string()
        } else if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        return Ok(Path::new(slice).join(unit));
    }
    let p = Path::new(cgroups_path);
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(CgroupError::BadPath(cgroups_path.into()));
    }
    Ok(p.strip_prefix("/").unwrap_or(p).to_path_buf())
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|source| CgroupError::Io { path, source })
}

fn v2(root: &Path, rel: &Path, r: &Resources, pid: u32) -> Result<(), CgroupError> {
    let dir = root.join(rel);
    std::fs::create_dir_all(&dir).map_err(|source| CgroupError::Io {
        path: dir.clone(),
        source,
    })?;
    // Enable the controllers we set, on every level above.
    let mut parent = root.to_path_buf();
    for comp in rel.components() {
        let _ = write(&parent, "cgroup.subtree_control", "+memory +cpu +pids");
        parent.push(comp);
    }
    if let Some(m) = r.memory_limit.filter(|m| *m > 0) {
        write(&dir, "memory.max", &m.to_string())?;
    }
    if let (Some(q), p) = (
        r.cpu_quota.filter(|q| *q > 0),
        r.cpu_period.unwrap_or(100_000),
    ) {
        write(&dir, "cpu.max", &format!("{q} {p}"))?;
    }
    if let Some(p) = r.pids_limit.filter(|p| *p > 0) {
        write(&dir, "pids.max", &p.to_string())?;
    }
    write(&dir, "cgroup.procs", &pid.to_string())
}

fn v1(rel: &Path, r: &Resources, pid: u32) -> Result<(), CgroupError> {
    let controllers = [
        "memory", "cpu", "cpuacct", "pids", "cpuset", "devices", "freezer", "blkio",
    ];
    for c in controllers {
        let root = Path::new(MOUNT).join(c);
        if !root.is_dir() {
            continue;
        }
        let dir = root.join(rel);
        std::fs::create_dir_all(&dir).map_err(|source| CgroupError::Io {
            path: dir.clone(),
            source,
        })?;
        if c == "cpuset" {
            // New cpuset cgroups start with no cpus or mems: give every level on the way
            // down its parent's.
            let mut level = root.clone();
            for comp in rel.components() {
                let parent = level.clone();
                level.push(comp);
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let empty = std::fs::read_to_string(level.join(f))
                        .map(|v| v.trim().is_empty())
                        .unwrap_or(false);
                    if empty {
                        if let Ok(v) = std::fs::read_to_string(parent.join(f)) {
                            write(&level, f, v.trim())?;
                        }
                    }
                }
            }
        }
        match c {
            "memory" => {
                if let Some(m) = r.memory_limit.filter(|m| *m > 0) {
                    write(&dir, "memory.limit_in_bytes", &m.to_string())?;
                }
            }
            "cpu" => {
                if let Some(p) = r.cpu_period {
                    write(&dir, "cpu.cfs_period_us", &p.to_string())?;
                }
                if let Some(q) = r.cpu_quota.filter(|q| *q > 0) {
                    write(&dir, "cpu.cfs_quota_us", &q.to_string())?;
                }
                if let Some(s) = r.cpu_shares.filter(|s| *s > 0) {
                    write(&dir, "cpu.shares", &s.to_string())?;
                }
            }
            "pids" => {
                if let Some(p) = r.pids_limit.filter(|p| *p > 0) {
                    write(&dir, "pids.max", &p.to_string())?;
                }
            }
            _ => {}
        }
        write(&dir, "cgroup.procs", &pid.to_string())?;
    }
    Ok(())
}

/// Moves the calling process into the container's cgroup, with its limits.
pub fn join(cgroups_path: &str, r: &Resources, systemd: bool) -> Result<(), CgroupError> {
    apply_to(cgroups_path, r, systemd, std::process::id())
}

/// Sets the limits of the container's cgroup and (re)places `pid` in it.
pub fn apply_to(
    cgroups_path: &str,
    r: &Resources,
    systemd: bool,
    pid: u32,
) -> Result<(), CgroupError> {
    let rel = relative_path(cgroups_path, systemd)?;
    if Path::new(MOUNT).join("cgroup.controllers").exists() {
        v2(Path::new(MOUNT), &rel, r, pid)
    } else {
        v1(&rel, r, pid)
    }
}

/// Removes the container's (now empty) cgroups; errors are ignored.
pub fn remove(cgroups_path: &str, systemd: bool) {
    let Ok(rel) = relative_path(cgroups_path, systemd) else {
        return;
    };
    let mut dirs = vec![Path::new(MOUNT).join(&rel)];
    if let Ok(entries) = std::fs::read_dir(MOUNT) {
        for e in entries.flatten() {
            dirs.push(e.path().join(&rel));
        }
    }
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            relative_path("/runvm/c1", false).unwrap(),
            PathBuf::from("runvm/c1")
        );
        assert_eq!(
            relative_path("rel/c1", false).unwrap(),
            PathBuf::from("rel/c1")
        );
        assert_eq!(
            relative_path("system.slice:docker:abc", true).unwrap(),
            PathBuf::from("system.slice/docker-abc.scope")
        );
        assert_eq!(
            relative_path(":runvm:x", true).unwrap(),
            PathBuf::from("system.slice/runvm-x.scope")
        );
        assert!(relative_path("/a/../../etc", false).is_err());
        assert!(relative_path("a:b", true).is_err());
    }

    #[test]
    fn v2_layout_is_written() {
        let root = std::env::temp_dir().join(format!("runvm-cg-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let r = Resources {
            memory_limit: Some(256 << 20),
            cpu_quota: Some(150_000),
            cpu_period: Some(100_000),
            cpu_shares: None,
            pids_limit: Some(100),
        };
        v2(&root, Path::new("a/b"), &r, 42).unwrap();
        let read = |f: &str| std::fs::read_to_string(root.join("a/b").join(f)).unwrap();
        assert_eq!(read("memory.max"), (256u64 << 20).to_string());
        assert_eq!(read("cpu.max"), "150000 100000");
        assert_eq!(read("pids.max"), "100");
        assert_eq!(read("cgroup.procs"), "42");
        assert_eq!(
            std::fs::read_to_string(root.join("a/cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        std::fs::remove_dir_all(root).unwrap();
    }
}
