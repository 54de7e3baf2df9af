//! Making a template: a sandbox VM of the shape is booted (its share an empty directory),
//! its agent's ready call awaited, and the VM saved at once, before anything of a
//! container reaches it. The snapshot is written into a temporary directory in the store
//! and renamed into place, so a template is either whole or absent; a failure (a full
//! disk, a VM that does not come up) leaves nothing. `spawn_background` starts a
//! detached `runvm template create` for a shape a container found missing; it hands the
//! builder the build lock it took, so no second builder ever waits behind the first.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vmm::{ConsoleOutput, HostProfile, VmConfig};

use super::{io_err, TemplateError, TemplateStore, BAD_PREFIX, BUILD_PREFIX};
use crate::sandbox::{self, Launch, Sandbox};

/// The log of background builds, in the store.
pub const BUILD_LOG: &str = ".build.log";

/// The descriptor a background builder finds the build lock on.
const LOCK_FD: i32 = 3;

/// How long a template's VM may take to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a template's VM may take to be saved once it is up: 2 minutes, and a second
/// for each 8 MiB of its memory (a disk of 8 MiB/s at least).
fn save_timeout(mem_mib: u64) -> Duration {
    Duration::from_secs(120 + mem_mib / 8)
}

/// What a build did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Built {
    /// The template was made now.
    Made(String),
    /// A usable one was there already.
    Existing(String),
}

/// Makes the template for VMs of `config` on a host with `profile` unless a usable one
/// exists; waits for a build already in progress first, unless `lock` is the build lock
/// already taken. A template there that is refused (corrupt, another format) is replaced.
pub fn make(
    store: &TemplateStore,
    mut config: VmConfig,
    profile: HostProfile,
    lock: Option<File>,
) -> Result<Built, TemplateError> {
    config.console = ConsoleOutput::Sink;
    store.ensure()?;
    let shape = sandbox::shape(&config, &profile, true)
        .map_err(io_err("reading the boot assets of", &config.kernel))?;
    let key = shape.key();
    let _lock = match lock {
        Some(l) => l,
        None => store.lock_builds()?,
    };
    match store.load(&shape) {
        Ok(Some(_)) => return Ok(Built::Existing(key)),
        Ok(None) => {}
        Err(e) => {
            log::warn!("template {key} is replaced: {e}");
            store.quarantine(&key)?;
        }
    }
    remove_leftovers(store);
    let result = store
        .check_space(config.mem_mib)
        .and_then(|()| build_into(store, &key, config, profile, &shape));
    match &result {
        Ok(()) => {
            store.clear_failure(&key);
            store.evict(super::MAX_TEMPLATES);
        }
        Err(e) => store.record_failure(&key, &crate::logging::error_line(e)),
    }
    result.map(|()| Built::Made(key))
}

/// Builds the template in a work directory of the store and renames it into place.
fn build_into(
    store: &TemplateStore,
    key: &str,
    config: VmConfig,
    profile: HostProfile,
    shape: &vmm::snapshot::Shape,
) -> Result<(), TemplateError> {
    let work = store
        .dir()
        .join(format!("{BUILD_PREFIX}{key}-{}", std::process::id()));
    let result = build_in(&work, config, profile, shape).and_then(|snap| {
        std::fs::rename(&snap, store.path(key)).map_err(io_err("placing", &snap))?;
        // The rename itself must reach the disk before the template counts as made.
        File::open(store.dir())
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", store.dir()))
    });
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn private_dir(path: &Path) -> Result<(), TemplateError> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(io_err("creating", path))
}

/// Boots the VM in `work` and saves it into `work/snapshot`, in a confined child
/// (`confine`); returns that directory.
fn build_in(
    work: &Path,
    mut config: VmConfig,
    profile: HostProfile,
    shape: &vmm::snapshot::Shape,
) -> Result<PathBuf, TemplateError> {
    private_dir(work)?;
    let work = std::fs::canonicalize(work).map_err(io_err("resolving", work))?;
    let share = work.join("share");
    let snap = work.join("snapshot");
    private_dir(&share)?;
    private_dir(&snap)?;
    // The child sees the assets at their own paths, links resolved.
    config.kernel =
        std::fs::canonicalize(&config.kernel).map_err(io_err("resolving", &config.kernel))?;
    if let Some(initrd) = &config.initrd {
        config.initrd = Some(std::fs::canonicalize(initrd).map_err(io_err("resolving", initrd))?);
    }
    let mut assets = vec![config.kernel.clone()];
    assets.extend(config.initrd.clone());
    let assets: Vec<&Path> = assets.iter().map(PathBuf::as_path).collect();
    let vsock = work.join(sandbox::VSOCK_NAME);
    let mode = config.seccomp;
    let timeout = READY_TIMEOUT + save_timeout(config.mem_mib);
    super::confine::run_confined(&work, &assets, mode, timeout, || {
        let launch = Launch {
            config,
            profile,
            vsock: &vsock,
            share: Some(&share),
            ready_timeout: READY_TIMEOUT,
            template: None,
            identity: None,
        };
        let vm = Sandbox::launch(launch, |_| {})?;
        let saved = vm.snapshot(&snap, shape);
        vm.handle().stop();
        let _ = vm.finish(Duration::ZERO);
        Ok(saved?)
    })?;
    Ok(snap)
}

/// Removes what builds that died left (their process is gone) and templates moved aside
/// (VMs that map one keep its pages).
fn remove_leftovers(store: &TemplateStore) {
    let Ok(entries) = std::fs::read_dir(store.dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(BAD_PREFIX) {
            let _ = std::fs::remove_dir_all(entry.path());
            continue;
        }
        let Some(pid) = name
            .strip_prefix(BUILD_PREFIX)
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Starts `runvm [flags] template create ...` for `config`'s shape in `store`, detached
/// (its own session, no stdio, not a child of this process), holding `lock`, the build
/// lock; `flags` name the boot assets. It logs to [`BUILD_LOG`] in the store.
pub fn spawn_background(
    store: &TemplateStore,
    flags: Vec<std::ffi::OsString>,
    config: &VmConfig,
    lock: File,
) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            log::debug!("not making a template: {e}");
            return;
        }
    };
    let log = store.dir().join(BUILD_LOG);
    if let Err(e) = crate::state::private_file()
        .create(true)
        .append(true)
        .open(&log)
    {
        log::debug!("not making a template: {e}");
        return;
    }
    let mut cmd = Command::new(exe);
    cmd.arg("--template-dir")
        .arg(store.dir())
        .arg("--log")
        .arg(&log)
        .args(flags)
        .args(["template", "create", "--memory"])
        .arg(config.mem_mib.to_string())
        .arg("--vcpus")
        .arg(config.vcpus.to_string())
        // One word: parameters that start with '-' are not flags.
        .arg(format!("--kernel-params={}", config.cmdline))
        .args(["--lock-fd", &LOCK_FD.to_string()])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let raw = lock.as_raw_fd();
    let detach = move || {
        // The builder must not be this process's child (a foreground `run` would keep
        // a zombie): the first child forks it and exits at once.
        // SAFETY: fork in the child of a fork, before exec; the intermediate child only
        // calls _exit.
        match unsafe { libc::fork() } {
            -1 => return Err(std::io::Error::last_os_error()),
            0 => {}
            // SAFETY: _exit ends the intermediate child without running anything else.
            _ => unsafe { libc::_exit(0) },
        }
        // Its own session, the lock at LOCK_FD, nothing else of this process's.
        crate::util::detach_child(raw, LOCK_FD)
    };
    // SAFETY: the hook only forks, calls _exit, setsid, dup2, fcntl and close_range.
    unsafe { cmd.pre_exec(detach) };
    match cmd.spawn() {
        Ok(mut child) => {
            let _ = child.wait();
        }
        Err(e) => log::debug!("not making a template: {e}"),
    }
}
