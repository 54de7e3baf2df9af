//! Templates: snapshots of sandbox VMs that booted until their agent was ready and idle,
//! nothing of any container in them yet, one per VM shape ([`vmm::snapshot::Shape`]: the
//! kernel, initramfs, command line, memory, vCPUs and devices, keyed by its hash). A
//! container's VMM restores the template of its shape instead of booting (see
//! `sandbox`); `create` asks for a missing one to be made in the background (`build`).
//!
//! The store is a directory (default `<root>/templates`) that belongs to the user running
//! runvm and that nobody else may read: it and every file in it must be owned by that user
//! with no group or other permissions, or a template in it is refused. Templates are made
//! in a temporary directory beside their final place and renamed into it, and removed by
//! unlinking: a VM that maps a template's memory keeps its pages, whatever happens to the
//! files later. One build runs at a time (a lock file in the store).

pub mod build;

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use vmm::snapshot::{self, Shape, Snapshot, SnapshotError};

/// Name of the build lock in the store.
const LOCK_FILE: &str = ".lock";
/// Prefix of a build's temporary directory in the store.
const BUILD_PREFIX: &str = ".build-";

/// Errors with templates.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template store {path} is refused: {reason}")]
    Unsafe { path: PathBuf, reason: String },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("no template {0}")]
    NotFound(String),
    #[error("making a template: {0}")]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Io { what, path, source }
}

/// One template in the store.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TemplateInfo {
    pub key: String,
    /// Its shape, when its state file is readable.
    pub shape: Option<Shape>,
    /// Disk space its files take, in bytes.
    pub disk_bytes: u64,
    /// When it was made (seconds since the epoch).
    pub created: i64,
    /// Why it would be refused, if it would.
    pub problem: Option<String>,
}

/// A directory of templates.
#[derive(Clone, Debug)]
pub struct TemplateStore {
    dir: PathBuf,
}

/// Refuses `path` unless it is owned by this user and closed to everyone else.
fn check_private(path: &Path) -> Result<std::fs::Metadata, TemplateError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_err("reading", path))?;
    let unsafe_because = |reason: String| TemplateError::Unsafe {
        path: path.to_path_buf(),
        reason,
    };
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unsafe_because(format!(
            "owned by uid {}, not {me}",
            meta.uid()
        )));
    }
    if meta.file_type().is_symlink() {
        return Err(unsafe_because("a symbolic link".into()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(unsafe_because(format!(
            "mode {:o} lets others in (0700 directories and 0600 files only)",
            meta.mode() & 0o7777
        )));
    }
    Ok(meta)
}

impl TemplateStore {
    /// The store in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TemplateStore { dir: dir.into() }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the template of `key` lives.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Creates the store (0700) if it is missing, and checks it is private.
    pub fn ensure(&self) -> Result<(), TemplateError> {
        if let Some(parent) = self.dir.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating", &self.dir)(e)),
        }
        check_private(&self.dir).map(|_| ())
    }

    /// Whether a template for `shape` is in the store (not whether it is usable).
    pub fn has(&self, shape: &Shape) -> bool {
        self.path(&shape.key()).is_dir()
    }

    /// Loads the template for `shape`: `None` when there is none, an error when the one
    /// there is refused (not private, corrupt, truncated, of another shape or format).
    pub fn load(&self, shape: &Shape) -> Result<Option<Snapshot>, TemplateError> {
        let path = self.path(&shape.key());
        if !path.exists() {
            return Ok(None);
        }
        check_private(&self.dir)?;
        check_private(&path)?;
        for file in [snapshot::STATE_FILE, snapshot::MEMORY_FILE] {
            check_private(&path.join(file))?;
        }
        Ok(Some(snapshot::load(&path, shape)?))
    }

    /// Every template in the store, in key order.
    pub fn list(&self) -> Result<Vec<TemplateInfo>, TemplateError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("reading", &self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            out.push(self.info(&name));
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn info(&self, key: &str) -> TemplateInfo {
        let path = self.path(key);
        let files = [snapshot::STATE_FILE, snapshot::MEMORY_FILE].map(|f| path.join(f));
        let disk_bytes = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.blocks() * 512)
            .sum();
        let created = std::fs::metadata(&files[0]).map_or(0, |m| m.mtime());
        let state = snapshot::file::read_state(&files[0]);
        let mut problem = files
            .iter()
            .chain([&path])
            .find_map(|f| check_private(f).err())
            .map(|e| e.to_string());
        if let Err(e) = &state {
            problem.get_or_insert(e.to_string());
        }
        TemplateInfo {
            key: key.to_string(),
            shape: state.ok().map(|s| s.shape),
            disk_bytes,
            created,
            problem,
        }
    }

    /// Removes the template `key` (VMs restored from it keep running).
    pub fn remove(&self, key: &str) -> Result<(), TemplateError> {
        if key.is_empty() || key.starts_with('.') || key.contains('/') {
            return Err(TemplateError::NotFound(key.to_string()));
        }
        let path = self.path(key);
        if !path.is_dir() {
            return Err(TemplateError::NotFound(key.to_string()));
        }
        std::fs::remove_dir_all(&path).map_err(io_err("removing", &path))
    }

    /// Takes the build lock, waiting for a build in progress.
    pub fn lock_builds(&self) -> Result<File, TemplateError> {
        self.open_lock(true)?
            .ok_or_else(|| io_err("locking", &self.dir)(std::io::ErrorKind::WouldBlock.into()))
    }

    /// Takes the build lock unless a build is in progress (someone holds it).
    pub fn try_lock_builds(&self) -> Result<Option<File>, TemplateError> {
        self.open_lock(false)
    }

    /// Whether a build is in progress (someone holds the build lock).
    pub fn building(&self) -> bool {
        matches!(self.open_lock(false), Ok(None))
    }

    fn open_lock(&self, wait: bool) -> Result<Option<File>, TemplateError> {
        let path = self.dir.join(LOCK_FILE);
        let file = crate::state::private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        let mode = if wait {
            rustix::fs::FlockOperation::LockExclusive
        } else {
            rustix::fs::FlockOperation::NonBlockingLockExclusive
        };
        match rustix::fs::flock(&file, mode) {
            Ok(()) => Ok(Some(file)),
            Err(rustix::io::Errno::WOULDBLOCK) if !wait => Ok(None),
            Err(e) => Err(io_err("locking", &path)(e.into())),
        }
    }
}

#[cfg(test)]
mod tests;
