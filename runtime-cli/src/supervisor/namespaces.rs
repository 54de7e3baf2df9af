//! The namespaces the VMM process takes from the spec before anything else (see
//! `translate::VmmNamespaces`): new ones, or the ones at the given paths. In a new UTS
//! namespace it also takes the container's hostname, so `/proc/<pid>/ns/uts` of the pid
//! runvm reports names the container's host name.

use std::fs::File;
use std::path::PathBuf;

use nix::sched::{setns, unshare, CloneFlags};

use crate::translate::{VmmNamespace, VmmNamespaces};

/// Why the VMM could not enter a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("new {kind} namespace: {source}")]
    New {
        kind: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("{kind} namespace {path}: {source}")]
    Open {
        kind: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("joining {kind} namespace {path}: {source}")]
    Join {
        kind: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("hostname {name:?}: {source}")]
    Hostname {
        name: String,
        #[source]
        source: nix::Error,
    },
}

fn enter(kind: &'static str, flag: CloneFlags, ns: &VmmNamespace) -> Result<(), NamespaceError> {
    match ns {
        VmmNamespace::New => unshare(flag).map_err(|source| NamespaceError::New { kind, source }),
        VmmNamespace::Join(path) => {
            let f = File::open(path).map_err(|source| NamespaceError::Open {
                kind,
                path: path.clone(),
                source,
            })?;
            setns(f, flag).map_err(|source| NamespaceError::Join {
                kind,
                path: path.clone(),
                source,
            })
        }
    }
}

/// Enters the namespaces; must run before the process has threads.
pub fn enter_all(ns: &VmmNamespaces, hostname: Option<&str>) -> Result<(), NamespaceError> {
    let all = [
        ("network", CloneFlags::CLONE_NEWNET, &ns.network),
        ("uts", CloneFlags::CLONE_NEWUTS, &ns.uts),
        ("ipc", CloneFlags::CLONE_NEWIPC, &ns.ipc),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP, &ns.cgroup),
    ];
    for (kind, flag, wanted) in all {
        if let Some(n) = wanted {
            enter(kind, flag, n)?;
        }
    }
    if let (Some(VmmNamespace::New), Some(name)) = (&ns.uts, hostname) {
        nix::unistd::sethostname(name).map_err(|source| NamespaceError::Hostname {
            name: name.into(),
            source,
        })?;
    }
    Ok(())
}
