//! The VMM's minimal root, as Firecracker's jailer gives its VMM one: once the share is
//! assembled and the cgroup joined, the VMM pivots (in its private mount namespace) into a
//! read-only tmpfs that holds only what it still opens by path:
//!
//! ```text
//! /                        tmpfs, read-only, nosuid, nodev, noexec
//!   <state dir>            the container's state directory (same absolute path)
//!     share                the share, with its submounts
//!   <kernel>, <initramfs>  the boot assets (same paths), read-only
//!   dev/kvm, dev/null      the only device nodes
//!   proc                   procfs with its process directories only (`subset=pid`),
//!                          for /proc/self/fd paths to long socket names
//! ```
//!
//! The host's file system is gone from the VMM's view: a VMM taken over by its guest
//! finds no host binaries, configuration or other containers' state to reach by path.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Name of the jail's mount point in the state directory (an empty directory outside
/// the VMM's mount namespace).
pub const JAIL_DIR: &str = "jail";

/// Why the VMM could not enter its minimal root.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("minimal root: {what} {path}: {source}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("minimal root: creating {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the VMM keeps in its minimal root.
#[derive(Debug)]
pub struct JailPlan<'a> {
    /// The container's state directory (absolute).
    pub state_dir: &'a Path,
    /// Files it reads later (kernel, initramfs), kept read-only.
    pub files: Vec<&'a Path>,
}

fn mount_err(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Mount { what, path, source }
}

fn create_err(path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Create { path, source }
}

/// `path` (absolute) under `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Binds `source` onto a new `target` of the same kind (`recursive`: with its submounts),
/// read-only with `readonly`.
fn bind(source: &Path, target: &Path, recursive: bool, readonly: bool) -> Result<(), JailError> {
    if source.is_dir() {
        std::fs::create_dir_all(target).map_err(create_err(target))?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(create_err(parent))?;
        }
        std::fs::File::create(target).map_err(create_err(target))?;
    }
    let none = None::<&str>;
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(source), target, none, flags, none).map_err(mount_err("binding", target))?;
    if readonly {
        let ro = MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        mount(none, target, none, ro, none).map_err(mount_err("read-only", target))?;
    }
    Ok(())
}

/// procfs limited to process directories where the kernel can (5.8), whole otherwise.
fn mount_proc(target: &Path) -> Result<(), JailError> {
    std::fs::create_dir_all(target).map_err(create_err(target))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let proc = |data| mount(Some("proc"), target, Some("proc"), flags, data);
    proc(Some("subset=pid"))
        .or_else(|_| proc(None))
        .map_err(mount_err("mounting proc on", target))
}

/// Builds the minimal root at `<state>/jail` and pivots into it. The caller is alone in
/// a private mount namespace and still has CAP_SYS_ADMIN.
pub fn enter(plan: &JailPlan) -> Result<(), JailError> {
    let root = plan.state_dir.join(JAIL_DIR);
    {
        // Private like the rest of the state directory, whatever the umask.
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&root)
            .and_then(|_| std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)))
            .map_err(create_err(&root))?;
    }
    let none = None::<&str>;
    let tmpfs = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("runvm-jail"),
        &root,
        Some("tmpfs"),
        tmpfs,
        Some("mode=0755,size=64k"),
    )
    .map_err(mount_err("mounting tmpfs on", &root))?;
    // The state directory alone, then the share with its submounts (a recursive bind of
    // the state directory would bring this tmpfs along).
    let state = inside(&root, plan.state_dir);
    bind(plan.state_dir, &state, false, false)?;
    let share = plan.state_dir.join(crate::state::files::SHARE);
    if share.is_dir() {
        bind(&share, &state.join(crate::state::files::SHARE), true, false)?;
    }
    for file in &plan.files {
        bind(file, &inside(&root, file), false, true)?;
    }
    for dev in ["/dev/kvm", "/dev/null"] {
        let dev = Path::new(dev);
        if dev.exists() {
            bind(dev, &inside(&root, dev), false, false)?;
        }
    }
    mount_proc(&root.join("proc"))?;
    pivot(&root)?;
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | tmpfs;
    mount(none, "/", none, ro, none).map_err(mount_err("read-only", Path::new("/")))
}

/// Makes `root` the root and cwd, the old root detached.
fn pivot(root: &Path) -> Result<(), JailError> {
    nix::unistd::chdir(root).map_err(mount_err("entering", root))?;
    // pivot_root(".", "."): the old root is stacked under the new one, then detached.
    nix::unistd::pivot_root(".", ".").map_err(mount_err("pivoting into", root))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(mount_err("detaching the old root", root))?;
    nix::unistd::chdir("/").map_err(mount_err("entering", Path::new("/")))
}
