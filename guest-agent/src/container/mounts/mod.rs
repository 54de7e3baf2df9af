//! The container's file system, built in its own mount namespace: the rootfs from the
//! share, the OCI mounts in order, device nodes, masked and read-only paths, and the
//! switch into the new root.
//!
//! Every mount target is resolved inside the root with libpathrs (`openat2` with
//! `RESOLVE_IN_ROOT`), so a destination that climbs out through `..` or symlinks in the
//! image lands inside the root, never outside; missing targets are created the same way.
//! The mount is then made on the resolved descriptor through `/proc/self/fd`.

mod devices;
mod options;

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agent_protocol::{ContainerSpec, Mount};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use pathrs::flags::OpenFlags;
use pathrs::{Handle, Root};

pub use options::{parse_options, Options};

/// Where the container's root is assembled (in the container's mount namespace).
pub const ROOT: &str = "/run/runvm/root";

/// Why the container's file system could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount destination {0:?} is not absolute")]
    NotAbsolute(String),
    #[error("mount {0} has no type")]
    NoType(String),
    #[error("rootfs {0} is not a directory in the share")]
    NoRootfs(String),
    #[error("bind source {source_path} for {destination}: {source}")]
    BindSource {
        source_path: String,
        destination: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is not a mount propagation")]
    Propagation(String),
    #[error("too many symlinks resolving {0}")]
    SymlinkLoop(String),
    #[error("device {path} has unknown type {kind:?}")]
    DeviceType { path: String, kind: String },
    #[error("{what} {path} in the root: {source}")]
    Path {
        what: &'static str,
        path: String,
        #[source]
        source: pathrs::error::Error,
    },
    #[error("{what} {path}: {source}")]
    Sys {
        what: &'static str,
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("creating {ROOT}: {0}")]
    RootDir(#[source] std::io::Error),
}

fn sys(what: &'static str, path: impl Into<String>) -> impl FnOnce(nix::Error) -> MountError {
    let path = path.into();
    move |source| MountError::Sys { what, path, source }
}

fn path_err(
    what: &'static str,
    path: impl Into<String>,
) -> impl FnOnce(pathrs::error::Error) -> MountError {
    let path = path.into();
    move |source| MountError::Path { what, path, source }
}

/// The path that names a descriptor's file (and, for mounts, its mount).
fn fd_path(fd: &impl AsFd) -> String {
    format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd())
}

/// Most symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` inside `root` the way the kernel would if `root` were `/`: `..` stops
/// at the root and symlinks are followed (absolute ones from the root), including the
/// ones that point at what does not exist yet, which is where runc creates a missing
/// mount point. Missing components are kept as they are.
fn resolve_in_root(root: &Root, path: &str) -> Result<PathBuf, MountError> {
    use std::path::Component;
    fn push_reversed(pending: &mut Vec<std::ffi::OsString>, p: &Path) {
        for c in p.components().rev() {
            match c {
                Component::Normal(n) => pending.push(n.to_os_string()),
                Component::ParentDir => pending.push("..".into()),
                _ => {}
            }
        }
    }
    let mut pending = Vec::new();
    push_reversed(&mut pending, Path::new(path));
    let mut current = PathBuf::from("/");
    let mut hops = 0;
    while let Some(comp) = pending.pop() {
        if comp == ".." {
            current.pop();
            continue;
        }
        let candidate = current.join(&comp);
        // Not a symlink (or not there): the component stands as it is.
        let Ok(link) = root.readlink(&candidate) else {
            current = candidate;
            continue;
        };
        hops += 1;
        if hops > MAX_SYMLINKS {
            return Err(MountError::SymlinkLoop(path.to_string()));
        }
        if link.is_absolute() {
            current = PathBuf::from("/");
        }
        push_reversed(&mut pending, &link);
    }
    Ok(current)
}

/// `dest` in the root, created when missing (a directory, or an empty file with `file`).
fn target(root: &Root, dest: &str, file: bool) -> Result<Handle, MountError> {
    if let Ok(h) = root.resolve(dest) {
        return Ok(h);
    }
    let resolved = resolve_in_root(root, dest)?;
    let dest = resolved.to_string_lossy();
    let dest = dest.as_ref();
    let dirs = std::fs::Permissions::from_mode(0o755);
    if !file {
        return root
            .mkdir_all(dest, &dirs)
            .map_err(path_err("creating", dest));
    }
    let parent = Path::new(dest).parent().unwrap_or(Path::new("/"));
    root.mkdir_all(parent, &dirs)
        .map_err(path_err("creating the directory of", dest))?;
    let perm = std::fs::Permissions::from_mode(0o644);
    root.create_file(dest, OpenFlags::O_RDONLY | OpenFlags::O_CREAT, &perm)
        .map_err(path_err("creating", dest))?;
    root.resolve(dest).map_err(path_err("resolving", dest))
}

/// Bind-mounts the source of `m` (a share path or a guest path) on its destination.
fn bind_mount(root: &Root, m: &Mount, o: &Options, share_root: &Path) -> Result<(), MountError> {
    let source = if m.share_source {
        share_root.join(&m.source)
    } else {
        PathBuf::from(&m.source)
    };
    let meta = std::fs::metadata(&source).map_err(|source| MountError::BindSource {
        source_path: m.source.clone(),
        destination: m.destination.clone(),
        source,
    })?;
    let dest = &m.destination;
    let t = target(root, dest, !meta.is_dir())?;
    let mut flags = MsFlags::MS_BIND;
    if o.recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(
        Some(&source),
        fd_path(&t).as_str(),
        None::<&str>,
        flags,
        None::<&str>,
    )
    .map_err(sys("bind mounting onto", dest.as_str()))?;
    if o.remount {
        // Resolve again: the old handle names the directory under the new mount.
        let t = root
            .resolve(dest)
            .map_err(path_err("resolving", dest.as_str()))?;
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | o.flags;
        mount(
            None::<&str>,
            fd_path(&t).as_str(),
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(sys("remounting", dest.as_str()))?;
    }
    Ok(())
}

/// Mounts a file system (proc, tmpfs, sysfs, ...) on the destination of `m`.
fn fs_mount(root: &Root, m: &Mount, o: &Options) -> Result<(), MountError> {
    let t = target(root, &m.destination, false)?;
    let kind = match m.kind.as_str() {
        // The guest has its own kernel: a v1 hierarchy name maps to its unified one.
        "cgroup" => "cgroup2",
        "" => return Err(MountError::NoType(m.destination.clone())),
        k => k,
    };
    let source = if m.source.is_empty() {
        kind
    } else {
        m.source.as_str()
    };
    let data = o.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    match mount(
        Some(source),
        fd_path(&t).as_str(),
        Some(kind),
        o.flags,
        data,
    ) {
        Ok(()) => Ok(()),
        Err(e) if kind == "cgroup2" => {
            // Container images expect cgroups, few need them: not fatal.
            eprintln!(
                "runvm-agent: mounting cgroup2 on {}: {e} (skipped)",
                m.destination
            );
            Ok(())
        }
        Err(e) => Err(sys("mounting", format!("{kind} on {}", m.destination))(e)),
    }
}

/// Applies one OCI mount under the root.
fn apply_mount(root: &Root, m: &Mount, share_root: &Path) -> Result<(), MountError> {
    if !m.destination.starts_with('/') {
        return Err(MountError::NotAbsolute(m.destination.clone()));
    }
    let o = parse_options(&m.options);
    if o.bind || m.kind == "bind" {
        bind_mount(root, m, &o, share_root)?;
    } else {
        fs_mount(root, m, &o)?;
    }
    if let Some(p) = o.propagation {
        let dest = m.destination.as_str();
        let t = root.resolve(dest).map_err(path_err("resolving", dest))?;
        mount(
            None::<&str>,
            fd_path(&t).as_str(),
            None::<&str>,
            p,
            None::<&str>,
        )
        .map_err(sys("setting the propagation of", dest))?;
    }
    Ok(())
}

/// Builds the container root at [`ROOT`]: rootfs, mounts, devices.
pub fn build_root(spec: &ContainerSpec, share_root: &Path) -> Result<(), MountError> {
    // Nothing done here may reach the agent's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making private", "/"))?;
    let rootfs = share_root.join(&spec.rootfs);
    if !rootfs.is_dir() {
        return Err(MountError::NoRootfs(spec.rootfs.clone()));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(ROOT)
        .map_err(MountError::RootDir)?;
    mount(
        Some(&rootfs),
        ROOT,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys("bind mounting the rootfs on", ROOT))?;
    let root = Root::open(ROOT).map_err(path_err("opening", ROOT))?;
    for m in &spec.mounts {
        apply_mount(&root, m, share_root)?;
    }
    devices::create_defaults(&root)?;
    for d in &spec.devices {
        devices::create(&root, d)?;
    }
    Ok(())
}

/// Makes [`ROOT`] the root: pivot_root (the old root detached), or chroot with `no_pivot`.
pub fn enter_root(no_pivot: bool) -> Result<(), MountError> {
    nix::unistd::chdir(ROOT).map_err(sys("chdir", ROOT))?;
    if no_pivot {
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(sys("moving the root", ROOT))?;
        nix::unistd::chroot(".").map_err(sys("chroot", ROOT))?;
    } else {
        // pivot_root(".", ".") stacks the old root under the new one; detach it.
        nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root", ROOT))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root", "/"))?;
    }
    nix::unistd::chdir("/").map_err(sys("chdir", "/"))
}

/// Gives the new root the propagation `linux.rootfsPropagation` asks for (after
/// [`enter_root`]); without one the root stays private, as the rest of the container.
pub fn set_root_propagation(propagation: Option<&str>) -> Result<(), MountError> {
    let Some(name) = propagation else {
        return Ok(());
    };
    let flags = parse_options(&[name.to_string()])
        .propagation
        .ok_or_else(|| MountError::Propagation(name.to_string()))?;
    mount(None::<&str>, "/", None::<&str>, flags, None::<&str>)
        .map_err(sys("setting the propagation of", "/"))
}

/// Masked paths (hidden behind /dev/null or an empty read-only tmpfs), read-only paths,
/// and a read-only root: applied inside the new root.
pub fn finish_root(spec: &ContainerSpec) -> Result<(), MountError> {
    for p in &spec.masked_paths {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            continue;
        };
        let r = if meta.is_dir() {
            mount(
                Some("tmpfs"),
                p.as_str(),
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            )
        } else {
            let flags = MsFlags::MS_BIND;
            mount(
                Some("/dev/null"),
                p.as_str(),
                None::<&str>,
                flags,
                None::<&str>,
            )
        };
        r.map_err(sys("masking", p.as_str()))?;
    }
    for p in &spec.readonly_paths {
        if std::fs::symlink_metadata(p).is_err() {
            continue;
        }
        let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
        mount(
            Some(p.as_str()),
            p.as_str(),
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(sys("making read-only", p.as_str()))?;
        let flags = flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, p.as_str(), None::<&str>, flags, None::<&str>)
            .map_err(sys("making read-only", p.as_str()))?;
    }
    if spec.readonly {
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
        mount(None::<&str>, "/", None::<&str>, flags, None::<&str>)
            .map_err(sys("making read-only", "/"))?;
    }
    Ok(())
}
