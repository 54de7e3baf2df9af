//! Work in another network namespace: a thread of its own enters it (network namespaces
//! are per thread), so the caller's namespace never changes, and sockets the work opens
//! (netlink, the tap) belong to that namespace.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Errors entering a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("entering network namespace {path}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("the thread working in network namespace {0} panicked")]
    Panicked(PathBuf),
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path` (`/proc/PID/ns/net` or a bind mount of one).
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.into(),
            source,
        })?;
        let netns = Netns {
            file,
            path: path.into(),
        };
        // NS_GET_NSTYPE says what kind of namespace a descriptor is.
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: NS_GET_NSTYPE takes no argument and only answers for namespace files.
        let kind =
            unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&netns.file), NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns { path: path.into() });
        }
        Ok(netns)
    }

    /// The namespace of process `pid`.
    pub fn of_pid(pid: i32) -> Result<Self, NetnsError> {
        Self::open(&PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    /// Whether this is the calling process's own namespace.
    pub fn is_own(&self) -> bool {
        let id = |m: std::fs::Metadata| (m.dev(), m.ino());
        match (self.file.metadata(), std::fs::metadata("/proc/self/ns/net")) {
            (Ok(a), Ok(b)) => id(a) == id(b),
            _ => false,
        }
    }

    /// The path it was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in a thread that lives in this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        std::thread::scope(|s| {
            let worker = s.spawn(|| {
                nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Enter {
                        path: self.path.clone(),
                        source,
                    })?;
                Ok(f())
            });
            worker
                .join()
                .unwrap_or_else(|_| Err(NetnsError::Panicked(self.path.clone())))
        })
    }
}
