//! Container state on disk: the state directory `<root>/<id>/`, the id rules, the lock
//! every mutating command takes, `state.json` (written atomically), and the status,
//! recomputed on every read from the VMM process (alive, and the same process: its start
//! time matches) rather than trusted from the file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The OCI spec version runvm implements.
pub const OCI_VERSION: &str = "1.2.0";
/// Longest container id accepted (also keeps socket paths short).
pub const MAX_ID_LEN: usize = 128;

/// Files in a container's state directory. Short names keep socket paths under the
/// 108-byte limit even for Docker's long ids and roots.
pub mod files {
    pub const STATE: &str = "state.json";
    pub const LOCK: &str = "lock";
    pub const CONTROL: &str = "ctl.sock";
    pub const VSOCK: &str = "v.sock";
    pub const CONSOLE_LOG: &str = "console.log";
    pub const SHARE: &str = "share";
    pub const EXIT: &str = "exit";
    /// One empty file per running `exec` proxy, named by its host pid (for `ps`).
    pub const EXECS: &str = "execs";
    /// Written by the VMM when its VM's template was refused or could not be restored.
    pub const TEMPLATE_REFUSED: &str = "template.refused";
    /// Written by the VMM when its VM's shape had no template (the template's key).
    pub const TEMPLATE_MISSING: &str = "template.missing";
}

/// Options for a file of runvm's own: mode 0600 whatever the umask (the VMM's is
/// cleared by its file-system backend), never followed through a symlink, closed on exec.
pub fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC);
    o
}

/// Writes `data` to a new private file at `path` (replacing one that is there).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    private_file()
        .create_new(true)
        .write(true)
        .open(path)?
        .write_all(data)
}

/// Makes `path` (a directory) 0700, whatever the umask made it.
fn private(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Errors about containers and their state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid container id {0:?}: use 1 to 128 characters of letters, digits, '_', '-', '.', '+' (not starting with '.')")]
    BadId(String),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state of container {id} is corrupt: {reason}")]
    Corrupt { id: String, reason: String },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks a container id before it touches the file system.
pub fn validate_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StateError::BadId(id.to_string()))
    }
}

/// The status of a container (OCI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        };
        f.write_str(s)
    }
}

/// `state.json`: the OCI state fields (plus runc's `rootfs`, `created`, `owner`), and
/// what runvm needs to recognise its VMM process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    /// The status last recorded; readers use [`State::refreshed`].
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    pub bundle: PathBuf,
    #[serde(default)]
    pub rootfs: PathBuf,
    pub created: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Start time of the VMM process (field 22 of /proc/PID/stat), to tell it from a
    /// later process with the same pid.
    #[serde(default)]
    pub vmm_start_time: u64,
    /// Set once `start` ran.
    #[serde(default)]
    pub started: bool,
    /// Set while the vCPUs are paused.
    #[serde(default)]
    pub paused: bool,
    /// The cgroup the VMM joined (`linux.cgroupsPath`), removed on delete: the bundle
    /// may be gone by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroups_path: Option<String>,
    /// The spec's memory limit (the guest's RAM), which `update` cannot change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<i64>,
    /// The container's network namespace and the interface its VM took over.
    #[serde(
        default,
        skip_serializing_if = "crate::network::NetworkState::is_empty"
    )]
    pub network: crate::network::NetworkState,
}

impl State {
    /// The status as of now: `stopped` once the VMM process is gone.
    pub fn refreshed(&self) -> Status {
        match (self.status, self.pid) {
            (Status::Creating, _) => Status::Creating,
            (_, Some(pid)) if process_start_time(pid) == Some(self.vmm_start_time) => {
                if self.paused {
                    Status::Paused
                } else if self.started {
                    Status::Running
                } else {
                    Status::Created
                }
            }
            _ => Status::Stopped,
        }
    }

    /// The JSON `runvm state` prints: the recorded state with the current status.
    pub fn to_output(&self) -> serde_json::Value {
        let mut copy = self.clone();
        copy.status = self.refreshed();
        let mut v = serde_json::to_value(&copy).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            for private in [
                "vmm_start_time",
                "started",
                "paused",
                "cgroups_path",
                "memory_limit",
            ] {
                o.remove(private);
            }
            if copy.status == Status::Stopped {
                o.insert("pid".into(), 0.into());
            }
        }
        v
    }
}

/// Start time (clock ticks since boot) of process `pid`, if it exists and is not a zombie.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); start time is field 22.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// A container's state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    pub root: PathBuf,
    pub id: String,
    pub dir: PathBuf,
}

impl StateDir {
    /// The directory of `id` under `root` (the id is validated).
    pub fn new(root: &Path, id: &str) -> Result<Self, StateError> {
        validate_id(id)?;
        // Absolute: the VMM keeps using these paths after it changed its root and cwd.
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        Ok(StateDir {
            root: root.clone(),
            id: id.to_string(),
            dir: root.join(id),
        })
    }

    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether the container exists.
    pub fn exists(&self) -> bool {
        self.file(files::STATE).exists() || self.dir.exists()
    }

    /// Creates the directory for a new container; fails if it exists.
    /// The root is made 0700 when runvm creates it; the container's directory is always
    /// 0700, whatever the umask, so nothing in it is reachable by another user.
    pub fn create(&self) -> Result<(), StateError> {
        if !self.root.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.root)
                .map_err(io_err("creating state root", &self.root))?;
            private(&self.root).map_err(io_err("creating state root", &self.root))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => private(&self.dir).map_err(io_err("creating state directory", &self.dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StateError::Exists(self.id.clone()))
            }
            Err(e) => Err(io_err("creating state directory", &self.dir)(e)),
        }
    }

    /// Takes the container's lock (blocking), for the life of the returned guard.
    pub fn lock(&self) -> Result<nix::fcntl::Flock<File>, StateError> {
        if !self.dir.exists() {
            return Err(StateError::NotFound(self.id.clone()));
        }
        let path = self.file(files::LOCK);
        let f = private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("opening lock", &path))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err("locking", &path)(e.into()))
    }

    /// Reads `state.json`.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.file(files::STATE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(self.id.clone()))
            }
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            id: self.id.clone(),
            reason: e.to_string(),
        })
    }

    /// Writes `state.json` atomically (temporary file, fsync, rename).
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let path = self.file(files::STATE);
        let tmp = self.file(".state.json.tmp");
        let data = serde_json::to_vec_pretty(state).expect("state serializes");
        let _ = std::fs::remove_file(&tmp);
        let mut f = private_file()
            .create_new(true)
            .write(true)
            .open(&tmp)
            .map_err(io_err("writing", &tmp))?;
        f.write_all(&data)
            .and_then(|_| f.sync_all())
            .map_err(io_err("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("renaming", &path))?;
        Ok(())
    }

    /// Removes the directory. Never recurses: the share directory may still have the
    /// bundle's rootfs mounted in it (in the VMM's mount namespace), and must not be
    /// emptied, only detached and removed.
    pub fn remove(&self) -> Result<(), StateError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("reading", &self.dir)(e)),
        };
        for e in entries.flatten() {
            let path = e.path();
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let r = if is_dir {
                let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
                std::fs::remove_dir(&path)
            } else {
                std::fs::remove_file(&path)
            };
            r.map_err(io_err("removing", &path))?;
        }
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &self.dir)(e)),
        }
    }
}

/// The ids of all containers under `root`.
pub fn list_ids(root: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(files::STATE).exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|id| validate_id(id).is_ok())
        .collect();
    ids.sort();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for ok in ["a", "abc-123", "x.y_z+1", &"f".repeat(128)] {
            validate_id(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a\0b",
            "with space",
            &"f".repeat(129),
            ".hidden",
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn status_follows_the_vmm_process() {
        let me = std::process::id() as i32;
        let mut s = State {
            oci_version: OCI_VERSION.into(),
            id: "x".into(),
            status: Status::Created,
            pid: Some(me),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2026-01-01T00:00:00Z".into(),
            owner: String::new(),
            annotations: Default::default(),
            vmm_start_time: process_start_time(me).unwrap(),
            started: false,
            paused: false,
            cgroups_path: None,
            memory_limit: None,
            network: Default::default(),
        };
        assert_eq!(s.refreshed(), Status::Created);
        s.started = true;
        assert_eq!(s.refreshed(), Status::Running);
        s.paused = true;
        assert_eq!(s.refreshed(), Status::Paused);
        // Another process with this pid (a different start time) is not our VMM.
        s.vmm_start_time += 1;
        assert_eq!(s.refreshed(), Status::Stopped);
        s.pid = Some(i32::MAX);
        assert_eq!(s.refreshed(), Status::Stopped);
        let out = s.to_output();
        assert_eq!(out["status"], "stopped");
        assert_eq!(out["pid"], 0);
        assert!(out.get("vmm_start_time").is_none());
        assert_eq!(out["ociVersion"], OCI_VERSION);
    }

    #[test]
    fn save_load_remove() {
        let root = std::env::temp_dir().join(format!("runvm-state-{}", std::process::id()));
        let d = StateDir::new(&root, "c1").unwrap();
        d.create().unwrap();
        assert!(matches!(d.create(), Err(StateError::Exists(_))));
        let s = State {
            oci_version: OCI_VERSION.into(),
            id: "c1".into(),
            status: Status::Created,
            pid: Some(1),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "t".into(),
            owner: "root".into(),
            annotations: [("k".to_string(), "v".to_string())].into(),
            vmm_start_time: 5,
            started: false,
            paused: false,
            cgroups_path: None,
            memory_limit: None,
            network: Default::default(),
        };
        d.save(&s).unwrap();
        assert_eq!(d.load().unwrap(), s);
        let _l = d.lock().unwrap();
        assert_eq!(list_ids(&root), vec!["c1".to_string()]);
        d.remove().unwrap();
        assert!(matches!(d.load(), Err(StateError::NotFound(_))));
        let _ = std::fs::remove_dir_all(&root);
    }
}
