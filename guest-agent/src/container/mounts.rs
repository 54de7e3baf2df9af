//! The container's file system, built in its own mount namespace: the rootfs from the
//! share, the OCI mounts in order, device nodes, masked and read-only paths, and the
//! switch into the new root.
//!
//! Every mount target is resolved inside the root with `openat2(RESOLVE_IN_ROOT)`, so a
//! destination that climbs out through `..` or symlinks in the image lands inside the
//! root, never outside; missing targets are created the same way. The mount is then made
//! on the resolved descriptor through `/proc/self/fd`.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use agent_protocol::{ContainerSpec, Device, Mount};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where the container's root is assembled (in the container's mount namespace).
pub const ROOT: &str = "/run/runvm/root";

/// Errors with the path or mount they concern.
pub type Error = String;

/// Mount flags and data parsed from OCI options.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub flags: MsFlags,
    /// Flags only a bind remount can apply (ro, nosuid, ...).
    pub remount: bool,
    pub bind: bool,
    pub recursive: bool,
    pub propagation: Option<MsFlags>,
    pub data: Vec<String>,
}

/// Mount propagation options and their flags (the `r` forms apply to the whole tree).
const PROPAGATION: [(&str, MsFlags); 8] = [
    ("private", MsFlags::MS_PRIVATE),
    ("rprivate", MsFlags::MS_PRIVATE.union(MsFlags::MS_REC)),
    ("shared", MsFlags::MS_SHARED),
    ("rshared", MsFlags::MS_SHARED.union(MsFlags::MS_REC)),
    ("slave", MsFlags::MS_SLAVE),
    ("rslave", MsFlags::MS_SLAVE.union(MsFlags::MS_REC)),
    ("unbindable", MsFlags::MS_UNBINDABLE),
    ("runbindable", MsFlags::MS_UNBINDABLE.union(MsFlags::MS_REC)),
];

/// Parses OCI mount options (`mount(8)` spelling).
pub fn parse_options(options: &[String]) -> Options {
    let mut o = Options {
        flags: MsFlags::empty(),
        remount: false,
        bind: false,
        recursive: false,
        propagation: None,
        data: Vec::new(),
    };
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "mand" | "nomand" | "tmpcopyup" | "remount" => (MsFlags::empty(), MsFlags::empty()),
            "bind" => {
                o.bind = true;
                continue;
            }
            "rbind" => {
                o.bind = true;
                o.recursive = true;
                continue;
            }
            other => {
                match PROPAGATION.iter().find(|(name, _)| *name == other) {
                    Some((_, p)) => o.propagation = Some(*p),
                    None => o.data.push(other.to_string()),
                }
                continue;
            }
        };
        o.flags.insert(set);
        o.flags.remove(clear);
    }
    o.remount = o.flags.intersects(
        MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC
            | MsFlags::MS_NOATIME,
    );
    o
}

/// Opens `path` (absolute, in container terms) under `root` with every component
/// resolved inside `root`.
fn open_in_root(root: &File, path: &Path, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let c = CString::new(rel.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads a valid path and open_how of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Maximum symlinks followed while resolving one path (as the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` inside `root` the way the kernel would if `root` were `/`: `..` stops
/// at the root, symlinks are followed (absolute ones from the root). Components that do
/// not exist are kept as they are. The result contains no `..` and no symlink that
/// existed when it was resolved.
pub fn resolve_in_root(root: &File, path: &Path) -> Result<PathBuf, Error> {
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .rev()
        .collect();
    let mut current = PathBuf::from("/");
    let mut hops = 0;
    while let Some(comp) = pending.pop() {
        if comp == ".." {
            current.pop();
            continue;
        }
        let candidate = current.join(&comp);
        let fd = match open_in_root(root, &candidate, libc::O_PATH | libc::O_NOFOLLOW) {
            Ok(fd) => fd,
            Err(_) => {
                current = candidate;
                continue;
            }
        };
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        let empty = CString::default();
        // SAFETY: fstatat with AT_EMPTY_PATH on a descriptor we own writes one stat.
        let r = unsafe {
            libc::fstatat(
                fd.as_raw_fd(),
                empty.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_EMPTY_PATH,
            )
        };
        // SAFETY: fstatat succeeded, so `st` is initialized.
        if r != 0 || unsafe { st.assume_init() }.st_mode & libc::S_IFMT != libc::S_IFLNK {
            current = candidate;
            continue;
        }
        hops += 1;
        if hops > MAX_SYMLINKS {
            return Err(format!("too many symlinks resolving {}", path.display()));
        }
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: readlinkat on an O_PATH symlink descriptor with an empty path writes at
        // most buf.len() bytes.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                empty.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(format!(
                "reading link {}: {}",
                candidate.display(),
                std::io::Error::last_os_error()
            ));
        }
        buf.truncate(n as usize);
        let target = PathBuf::from(std::ffi::OsString::from(
            String::from_utf8_lossy(&buf).into_owned(),
        ));
        if target.is_absolute() {
            current = PathBuf::from("/");
        }
        for c in target.components().rev() {
            match c {
                Component::Normal(n) => pending.push(n.to_os_string()),
                Component::ParentDir => pending.push("..".into()),
                _ => {}
            }
        }
    }
    Ok(current)
}

/// Makes sure `path` exists under `root` (a directory, or an empty file when `file`),
/// creating what is missing inside the root; returns an O_PATH descriptor of it.
pub fn ensure_in_root(root: &File, path: &Path, file: bool) -> Result<OwnedFd, Error> {
    let resolved = resolve_in_root(root, path)?;
    if let Ok(fd) = open_in_root(root, &resolved, libc::O_PATH) {
        return Ok(fd);
    }
    let comps: Vec<_> = resolved
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    let mut partial = PathBuf::from("/");
    for (i, comp) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let parent = open_in_root(root, &partial, libc::O_PATH | libc::O_DIRECTORY)
            .map_err(|e| format!("resolving {} in the root: {e}", partial.display()))?;
        partial.push(comp);
        if open_in_root(root, &partial, libc::O_PATH).is_ok() {
            continue;
        }
        let name = CString::new(comp.as_os_str().as_encoded_bytes())
            .map_err(|_| "NUL in path".to_string())?;
        // SAFETY: mkdirat/mknodat on a directory descriptor we own, with a valid name.
        let r = unsafe {
            if last && file {
                libc::mknodat(parent.as_raw_fd(), name.as_ptr(), libc::S_IFREG | 0o644, 0)
            } else {
                libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755)
            }
        };
        if r != 0 {
            return Err(format!(
                "creating {} in the root: {}",
                partial.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    open_in_root(root, &resolved, libc::O_PATH)
        .map_err(|e| format!("resolving {} in the root: {e}", path.display()))
}

fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Applies one OCI mount under the root.
fn apply_mount(root: &File, m: &Mount, share_root: &Path) -> Result<(), Error> {
    if !m.destination.starts_with('/') {
        return Err(format!(
            "mount destination {:?} is not absolute",
            m.destination
        ));
    }
    let o = parse_options(&m.options);
    let bind = o.bind || m.kind == "bind";
    let dest = Path::new(&m.destination);
    if bind {
        let source = if m.share_source {
            share_root.join(&m.source)
        } else {
            PathBuf::from(&m.source)
        };
        let meta = std::fs::metadata(&source)
            .map_err(|e| format!("bind source {} for {}: {e}", m.source, m.destination))?;
        let target = ensure_in_root(root, dest, !meta.is_dir())?;
        let mut flags = MsFlags::MS_BIND;
        if o.recursive {
            flags |= MsFlags::MS_REC;
        }
        mount(
            Some(&source),
            fd_path(&target).as_str(),
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(|e| {
            format!(
                "bind mounting {} on {}: {e}",
                source.display(),
                m.destination
            )
        })?;
        if o.remount {
            // Reopen: the descriptor still names the directory under the new mount.
            let target = open_in_root(root, dest, libc::O_PATH)
                .map_err(|e| format!("{}: {e}", m.destination))?;
            mount(
                None::<&str>,
                fd_path(&target).as_str(),
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | o.flags,
                None::<&str>,
            )
            .map_err(|e| format!("remounting {} with {:?}: {e}", m.destination, m.options))?;
        }
    } else {
        let target = ensure_in_root(root, dest, false)?;
        let kind = match m.kind.as_str() {
            // The guest has its own kernel: a v1 hierarchy name maps to its unified one.
            "cgroup" => "cgroup2",
            "" => return Err(format!("mount {} has no type", m.destination)),
            k => k,
        };
        let source = if m.source.is_empty() {
            kind
        } else {
            m.source.as_str()
        };
        let data = o.data.join(",");
        let result = mount(
            Some(source),
            fd_path(&target).as_str(),
            Some(kind),
            o.flags,
            (!data.is_empty()).then_some(data.as_str()),
        );
        if let Err(e) = result {
            if kind == "cgroup2" {
                // Container images expect cgroups, few need them: not fatal.
                eprintln!(
                    "runvm-agent: mounting cgroup2 on {}: {e} (skipped)",
                    m.destination
                );
                return Ok(());
            }
            return Err(format!("mounting {kind} on {}: {e}", m.destination));
        }
    }
    if let Some(p) = o.propagation {
        let target = open_in_root(root, dest, libc::O_PATH)
            .map_err(|e| format!("{}: {e}", m.destination))?;
        mount(
            None::<&str>,
            fd_path(&target).as_str(),
            None::<&str>,
            p,
            None::<&str>,
        )
        .map_err(|e| format!("setting propagation of {}: {e}", m.destination))?;
    }
    Ok(())
}

fn mknod_in_root(
    root: &File,
    path: &str,
    kind: libc::mode_t,
    mode: u32,
    major: u64,
    minor: u64,
    owner: Option<(u32, u32)>,
) -> Result<(), Error> {
    let p = Path::new(path);
    if open_in_root(root, p, libc::O_PATH).is_ok() {
        return Ok(());
    }
    let parent = p.parent().unwrap_or(Path::new("/"));
    let dir = ensure_in_root(root, parent, false)?;
    let dirfd = open_in_root(root, parent, libc::O_PATH | libc::O_DIRECTORY)
        .map_err(|e| format!("{path}: {e}"))?;
    drop(dir);
    let name = CString::new(p.file_name().unwrap_or_default().as_encoded_bytes())
        .map_err(|_| "NUL in path".to_string())?;
    // SAFETY: mknodat on a directory descriptor we own with a valid name.
    let r = unsafe {
        libc::mknodat(
            dirfd.as_raw_fd(),
            name.as_ptr(),
            kind | (mode & 0o7777),
            libc::makedev(major as u32, minor as u32),
        )
    };
    if r != 0 {
        return Err(format!(
            "creating device {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    if let Some((uid, gid)) = owner {
        // SAFETY: fchownat on a directory descriptor we own with a valid name.
        unsafe {
            libc::fchownat(
                dirfd.as_raw_fd(),
                name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
    }
    Ok(())
}

/// The devices every container gets, and its /dev symlinks.
fn default_devices(root: &File) -> Result<(), Error> {
    for (path, major, minor) in [
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
        ("/dev/tty", 5, 0),
    ] {
        mknod_in_root(root, path, libc::S_IFCHR, 0o666, major, minor, None)?;
    }
    let dev = ensure_in_root(root, Path::new("/dev"), false)?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let l = CString::new(link).expect("static");
        let t = CString::new(target).expect("static");
        // SAFETY: symlinkat with valid strings on a descriptor we own; EEXIST is fine.
        unsafe { libc::symlinkat(t.as_ptr(), dev.as_raw_fd(), l.as_ptr()) };
    }
    // /dev/fd etc. resolve through an O_PATH fd of /dev: it must be a real directory.
    let _ = ensure_in_root(root, Path::new("/dev/pts"), false);
    let _ = ensure_in_root(root, Path::new("/dev/shm"), false);
    Ok(())
}

fn spec_device(root: &File, d: &Device) -> Result<(), Error> {
    let kind = match d.kind.as_str() {
        "c" | "u" => libc::S_IFCHR,
        "b" => libc::S_IFBLK,
        "p" => libc::S_IFIFO,
        other => return Err(format!("device {} has unknown type {other:?}", d.path)),
    };
    let owner = Some((d.uid.unwrap_or(0), d.gid.unwrap_or(0)));
    mknod_in_root(
        root,
        &d.path,
        kind,
        d.file_mode.unwrap_or(0o666),
        d.major as u64,
        d.minor as u64,
        owner,
    )
}

/// Builds the container root at [`ROOT`]: rootfs, mounts, devices. Returns the root.
pub fn build_root(spec: &ContainerSpec, share_root: &Path) -> Result<File, Error> {
    // Nothing done here may reach the agent's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {e}"))?;
    let rootfs = share_root.join(&spec.rootfs);
    if !rootfs.is_dir() {
        return Err(format!(
            "rootfs {} is not a directory in the share",
            spec.rootfs
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(ROOT)
        .map_err(|e| format!("creating {ROOT}: {e}"))?;
    mount(
        Some(&rootfs),
        ROOT,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind mounting the rootfs: {e}"))?;
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_PATH)
        .open(ROOT)
        .map_err(|e| format!("opening {ROOT}: {e}"))?;
    for m in &spec.mounts {
        apply_mount(&root, m, share_root)?;
    }
    default_devices(&root)?;
    for d in &spec.devices {
        spec_device(&root, d)?;
    }
    Ok(root)
}

/// Makes [`ROOT`] the root: pivot_root (the old root detached), or chroot with `no_pivot`.
pub fn enter_root(no_pivot: bool) -> Result<(), Error> {
    nix::unistd::chdir(ROOT).map_err(|e| format!("chdir {ROOT}: {e}"))?;
    if no_pivot {
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(|e| format!("moving the root: {e}"))?;
        nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    } else {
        // pivot_root(".", ".") stacks the old root under the new one; detach it.
        nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detaching the old root: {e}"))?;
    }
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// Masked paths (hidden behind /dev/null or an empty read-only tmpfs), read-only paths,
/// and a read-only root: applied inside the new root.
pub fn finish_root(spec: &ContainerSpec) -> Result<(), Error> {
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
            mount(
                Some("/dev/null"),
                p.as_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        };
        r.map_err(|e| format!("masking {p}: {e}"))?;
    }
    for p in &spec.readonly_paths {
        if std::fs::symlink_metadata(p).is_err() {
            continue;
        }
        mount(
            Some(p.as_str()),
            p.as_str(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("read-only {p}: {e}"))?;
        mount(
            None::<&str>,
            p.as_str(),
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("read-only {p}: {e}"))?;
    }
    if spec.readonly {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| format!("read-only root: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Options {
        parse_options(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_become_flags_data_and_propagation() {
        let o = opts(&["nosuid", "noexec", "nodev", "mode=755", "size=65536k"]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV
        );
        assert_eq!(o.data, ["mode=755", "size=65536k"]);
        assert!(!o.bind);
        let o = opts(&["rbind", "ro", "rprivate"]);
        assert!(o.bind && o.recursive && o.remount);
        assert_eq!(o.flags, MsFlags::MS_RDONLY);
        assert_eq!(o.propagation, Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC));
        // Later options override earlier ones.
        assert_eq!(opts(&["ro", "rw"]).flags, MsFlags::empty());
        assert!(!opts(&["bind"]).remount);
    }
}
