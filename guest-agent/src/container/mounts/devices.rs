//! Device nodes in the container's root: the ones every container gets (null, zero, full,
//! random, urandom, tty and the /dev symlinks) and `linux.devices`, with their exact modes
//! and owners.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use agent_protocol::Device;
use pathrs::{InodeType, Root};

use super::MountError;

/// The devices every container gets: path, major, minor.
const DEFAULT_DEVICES: [(&str, u32, u32); 6] = [
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

/// The /dev symlinks every container gets.
const DEFAULT_LINKS: [(&str, &str); 5] = [
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
    ("/dev/ptmx", "pts/ptmx"),
];

fn path_err(what: &'static str, path: &str) -> impl FnOnce(pathrs::error::Error) -> MountError {
    let path = path.to_string();
    move |source| MountError::Path { what, path, source }
}

/// Creates a device node (unless `path` exists) with exactly `mode` and `owner`: the
/// node's mode is set after creation, so no umask narrows it.
fn node(
    root: &Root,
    path: &str,
    kind: &str,
    mode: u32,
    dev: u64,
    owner: (u32, u32),
) -> Result<(), MountError> {
    if root.resolve_nofollow(path).is_ok() {
        return Ok(());
    }
    let parent = Path::new(path).parent().unwrap_or(Path::new("/"));
    root.mkdir_all(parent, &std::fs::Permissions::from_mode(0o755))
        .map_err(path_err("creating the directory of", path))?;
    let perm = std::fs::Permissions::from_mode(mode & 0o7777);
    let inode = match kind {
        "c" | "u" => InodeType::CharacterDevice(perm, dev),
        "b" => InodeType::BlockDevice(perm, dev),
        "p" => InodeType::Fifo(perm),
        other => {
            return Err(MountError::DeviceType {
                path: path.into(),
                kind: other.into(),
            })
        }
    };
    root.create(path, &inode)
        .map_err(path_err("creating device", path))?;
    let handle = root
        .resolve_nofollow(path)
        .map_err(path_err("opening device", path))?;
    let magic = super::fd_path(&handle);
    let sys = |what: &'static str| {
        let path = path.to_string();
        move |source| MountError::Sys { what, path, source }
    };
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        magic.as_str(),
        nix::sys::stat::Mode::from_bits_truncate(mode & 0o7777),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(sys("setting the mode of device"))?;
    nix::unistd::chown(
        magic.as_str(),
        Some(nix::unistd::Uid::from_raw(owner.0)),
        Some(nix::unistd::Gid::from_raw(owner.1)),
    )
    .map_err(sys("setting the owner of device"))
}

/// The devices and symlinks every container gets.
pub fn create_defaults(root: &Root) -> Result<(), MountError> {
    for (path, major, minor) in DEFAULT_DEVICES {
        node(
            root,
            path,
            "c",
            0o666,
            rustix::fs::makedev(major, minor),
            (0, 0),
        )?;
    }
    for (link, target) in DEFAULT_LINKS {
        // An image may already have them.
        let _ = root.create(link, &InodeType::Symlink(target.into()));
    }
    for dir in ["/dev/pts", "/dev/shm"] {
        let _ = root.mkdir_all(dir, &std::fs::Permissions::from_mode(0o755));
    }
    Ok(())
}

/// One `linux.devices` entry.
pub fn create(root: &Root, d: &Device) -> Result<(), MountError> {
    let dev = rustix::fs::makedev(d.major as u32, d.minor as u32);
    let owner = (d.uid.unwrap_or(0), d.gid.unwrap_or(0));
    node(
        root,
        &d.path,
        &d.kind,
        d.file_mode.unwrap_or(0o666),
        dev,
        owner,
    )
}
