//! Templates: snapshots of sandbox VMs that booted until their agent was ready and idle,
//! nothing of any container in them yet, one per VM shape ([`vmm::snapshot::Shape`]: the
//! kernel, initramfs, command line, memory, vCPUs and devices, keyed by its hash). A
//! container's VMM restores the template of its shape instead of booting (see
//! `sandbox`); `create` asks for a missing one to be made in the background (`build`).
//!
//! The store is a directory (default `<root>/.templates`) that belongs to the user running
//! runvm and that nobody else may read: it and every file in it must be owned by that user
//! with no group or other permissions, or a template in it is refused. A template is
//! opened directory by directory without following links, and what is checked is what
//! was opened. Templates are made in a temporary directory beside their final place and
//! renamed into it, and removed by unlinking: a VM that maps a template's memory keeps its
//! pages, whatever happens to the files later. One build runs at a time (a lock file in
//! the store); a template a VM could not use is moved aside (`quarantine`) so the next
//! container's builder replaces it; a shape whose build failed is not tried again for a
//! while; the store keeps at most [`MAX_TEMPLATES`], the least recently used go first.

pub mod build;
pub mod confine;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use rustix::fs::{Mode, OFlags};
use vmm::snapshot::{self, Shape, Snapshot, SnapshotError};

/// Name of the build lock in the store.
const LOCK_FILE: &str = ".lock";
/// Prefix of a build's temporary directory in the store.
const BUILD_PREFIX: &str = ".build-";
/// Prefix of a template moved aside because a VM could not use it.
const BAD_PREFIX: &str = ".bad-";
/// Prefix of the record of a failed build of a shape.
const FAILED_PREFIX: &str = ".failed-";
/// How long a shape whose build failed is not built again in the background.
pub const FAILED_BACKOFF: Duration = Duration::from_secs(600);
/// Most templates the store keeps.
pub const MAX_TEMPLATES: usize = 8;
/// Longest wait for another build to finish.
const LOCK_TIMEOUT: Duration = Duration::from_secs(900);

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
    #[error("making a template: confining its VM: {0}")]
    Confine(#[from] confine::ConfineError),
    #[error("making a template: {reason}")]
    Builder { reason: String },
    /// The error line of the child that ran the template's VM, as it wrote it.
    #[error("{line}")]
    Child { line: String },
    #[error("another template build held {path} for {waited:?}")]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("{path}: {free_mib} MiB free, a template of {need_mib} MiB of guest memory may need them all")]
    NoSpace {
        path: PathBuf,
        free_mib: u64,
        need_mib: u64,
    },
}

/// Whether `s` has the form of a template key ([`Shape::key`]: 32 lowercase hex digits),
/// so that it names a directory of the store and nothing else.
pub fn is_key(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
    check_private_meta(path, meta)
}

/// [`check_private`] of what was opened: `file`, opened at `path`.
fn check_private_file(path: &Path, file: &File) -> Result<(), TemplateError> {
    let meta = file.metadata().map_err(io_err("reading", path))?;
    check_private_meta(path, meta).map(|_| ())
}

fn check_private_meta(
    path: &Path,
    meta: std::fs::Metadata,
) -> Result<std::fs::Metadata, TemplateError> {
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
    /// The store in `dir` (made absolute: builders run elsewhere).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir: PathBuf = dir.into();
        TemplateStore {
            dir: std::path::absolute(&dir).unwrap_or(dir),
        }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the template of `key` lives.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Creates the store (0700, and its missing parents 0700 too) if it is missing, and
    /// checks it is private.
    pub fn ensure(&self) -> Result<(), TemplateError> {
        if let Some(parent) = self.dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_err("creating", parent))?;
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
    /// The store, the template's directory and its files are opened one below the other,
    /// never through a link, and checked as opened.
    pub fn load(&self, shape: &Shape) -> Result<Option<Snapshot>, TemplateError> {
        let key = shape.key();
        let path = self.path(&key);
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let store = match rustix::fs::open(&self.dir, dir_flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io_err("opening", &self.dir)(e.into())),
        };
        check_private_file(&self.dir, &store)?;
        let dir = match rustix::fs::openat(store.as_fd(), key.as_str(), dir_flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io_err("opening", &path)(e.into())),
        };
        check_private_file(&path, &dir)?;
        let file_flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let mut files = Vec::with_capacity(2);
        for name in [snapshot::STATE_FILE, snapshot::MEMORY_FILE] {
            let at = path.join(name);
            let f = rustix::fs::openat(dir.as_fd(), name, file_flags, Mode::empty())
                .map(File::from)
                .map_err(|e| io_err("opening", &at)(e.into()))?;
            let meta = f.metadata().map_err(io_err("reading", &at))?;
            if !check_private_meta(&at, meta)?.is_file() {
                return Err(TemplateError::Unsafe {
                    path: at,
                    reason: "not a regular file".into(),
                });
            }
            files.push(f);
        }
        let memory = files.pop().unwrap_or_else(|| unreachable!());
        let state = files.pop().unwrap_or_else(|| unreachable!());
        Ok(Some(snapshot::file::load_files(
            &path, state, memory, shape,
        )?))
    }

    /// Marks the template `key` as used now (the store evicts the least recently used).
    pub fn touch(&self, key: &str) {
        if let Ok(dir) = File::open(self.path(key)) {
            let _ = dir.set_modified(SystemTime::now());
        }
    }

    /// [`TemplateStore::quarantine`] of the template `key` only while it is the one whose
    /// directory has device `dev` and inode `ino` (one made since stays). The caller
    /// holds the build lock.
    pub fn quarantine_if(&self, key: &str, dev: u64, ino: u64) -> Result<(), TemplateError> {
        use std::os::unix::fs::MetadataExt;
        if !is_key(key) {
            return Err(TemplateError::NotFound(key.to_string()));
        }
        match std::fs::symlink_metadata(self.path(key)) {
            Ok(m) if m.dev() == dev && m.ino() == ino => self.quarantine(key),
            _ => Ok(()),
        }
    }

    /// Moves the template `key` aside (a VM could not use it), so that a builder makes
    /// it again; what is moved aside goes with the next build.
    pub fn quarantine(&self, key: &str) -> Result<(), TemplateError> {
        let path = self.path(key);
        let aside = self
            .dir
            .join(format!("{BAD_PREFIX}{key}-{}", std::process::id()));
        match std::fs::rename(&path, &aside) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("moving aside", &path)(e)),
        }
    }

    /// Records that building `key` failed with `why`.
    pub fn record_failure(&self, key: &str, why: &str) {
        let path = self.dir.join(format!("{FAILED_PREFIX}{key}"));
        let _ = crate::state::write_private(&path, format!("{why}\n").as_bytes());
    }

    /// Whether a build of `key` failed less than [`FAILED_BACKOFF`] ago.
    pub fn failed_recently(&self, key: &str) -> bool {
        let path = self.dir.join(format!("{FAILED_PREFIX}{key}"));
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < FAILED_BACKOFF)
    }

    /// Forgets a failed build of `key`.
    pub fn clear_failure(&self, key: &str) {
        let _ = std::fs::remove_file(self.dir.join(format!("{FAILED_PREFIX}{key}")));
    }

    /// Removes the least recently used templates until `keep` remain.
    pub fn evict(&self, keep: usize) {
        let Ok(mut list) = self.list() else {
            return;
        };
        let used = |key: &str| {
            std::fs::metadata(self.path(key))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        list.sort_by_key(|t| std::cmp::Reverse(used(&t.key)));
        for t in list.iter().skip(keep) {
            log::info!("template {} evicted (least recently used)", t.key);
            let _ = self.remove(&t.key);
        }
    }

    /// Checks the store's file system has room for a template of `mem_mib` of guest
    /// memory (its memory file holds what the guest touched, at most all of it).
    pub fn check_space(&self, mem_mib: u64) -> Result<(), TemplateError> {
        let st = nix::sys::statvfs::statvfs(&self.dir)
            .map_err(|e| io_err("checking the space of", &self.dir)(e.into()))?;
        let free_mib = (st.blocks_available() * st.fragment_size()) >> 20;
        if free_mib < mem_mib {
            return Err(TemplateError::NoSpace {
                path: self.dir.clone(),
                free_mib,
                need_mib: mem_mib,
            });
        }
        Ok(())
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

    /// Takes the build lock, waiting (up to a deadline) for a build in progress.
    pub fn lock_builds(&self) -> Result<File, TemplateError> {
        let started = Instant::now();
        loop {
            if let Some(lock) = self.open_lock()? {
                return Ok(lock);
            }
            if started.elapsed() > LOCK_TIMEOUT {
                return Err(TemplateError::LockTimeout {
                    path: self.dir.join(LOCK_FILE),
                    waited: LOCK_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `file` is this store's build lock, held by this process (a lock handed
    /// over by the runvm that started it).
    pub fn is_build_lock(&self, file: &File) -> bool {
        let path = self.dir.join(LOCK_FILE);
        let same = match (file.metadata(), std::fs::metadata(&path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        // flock on the open file description that holds the lock succeeds again.
        same && rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .is_ok()
    }

    /// Takes the build lock unless a build is in progress (someone holds it).
    pub fn try_lock_builds(&self) -> Result<Option<File>, TemplateError> {
        self.open_lock()
    }

    /// Whether a build is in progress (someone holds the build lock).
    pub fn building(&self) -> bool {
        matches!(self.open_lock(), Ok(None))
    }

    fn open_lock(&self) -> Result<Option<File>, TemplateError> {
        let path = self.dir.join(LOCK_FILE);
        let file = crate::state::private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(file)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(io_err("locking", &path)(e.into())),
        }
    }
}

#[cfg(test)]
mod tests;
