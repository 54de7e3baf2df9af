//! The container share: one directory the VM sees over virtio-fs, assembled by the VMM
//! process in its own mount namespace so that nothing here is visible outside it and
//! everything vanishes with it:
//!
//! ```text
//! <state>/share            tmpfs, read-only once assembled
//!   rootfs                 the bundle's rootfs (rbind, nosuid,nodev)
//!   mounts/<n>             each bind-mount source (rbind; nosuid,nodev [,ro] on every
//!                          mount of it, submounts included)
//! ```
//!
//! `nosuid,nodev` on the host side mean that device nodes and set-id files the guest
//! creates in the share give nothing on the host; read-only binds are enforced by the
//! host (EROFS), not only by the guest's mount flags. A read-only root (`root.readonly`) is
//! made read-only by the guest, after it created the spec's missing mount points in it.

use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::translate::{ShareBind, SHARE_ROOTFS};

/// Errors assembling the share.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("private mount namespace: {0}")]
    Namespace(nix::Error),
    #[error("{what} {path}: {source}")]
    Mount {
        what: &'static str,
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Moves the calling process into a mount namespace of its own whose mounts do not
/// propagate back. Must run before the process starts threads.
pub fn private_mount_namespace() -> Result<(), ShareError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(ShareError::Namespace)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(ShareError::Namespace)
}

fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), ShareError> {
    let err = |what| {
        let path = target.display().to_string();
        move |source| ShareError::Mount { what, path, source }
    };
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err("bind mounting into"))?;
    let mut attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if readonly {
        attrs |= MOUNT_ATTR_RDONLY;
    }
    set_recursive(target, attrs).map_err(err("setting mount flags on"))
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Sets `attrs` on the mount at `target` and every mount below it (an rbind brings the
/// source's submounts along; a remount would change only the top one). Neither nix nor
/// rustix wraps mount_setattr(2) (Linux 5.12).
fn set_recursive(target: &Path, attrs: u64) -> Result<(), nix::Error> {
    let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()))
        .map_err(|_| nix::Error::EINVAL)?;
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is a NUL-terminated string and `attr` a `struct mount_attr` whose
    // size is passed; both outlive the call, which only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(nix::Error::last())
    }
}

/// Assembles the share at `dir` (in the caller's private mount namespace).
pub fn build(dir: &Path, rootfs: &Path, binds: &[ShareBind]) -> Result<(), ShareError> {
    let io = |what: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| ShareError::Io { what, path, source }
    };
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .and_then(|_| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(io("creating", dir))?;
    }
    mount(
        Some("runvm-share"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .map_err(|source| ShareError::Mount {
        what: "mounting tmpfs on",
        path: dir.display().to_string(),
        source,
    })?;
    let root_target = dir.join(SHARE_ROOTFS);
    std::fs::create_dir(&root_target).map_err(io("creating", &root_target))?;
    // Writable even for a read-only root: the guest creates the mount points the spec
    // needs and then makes its root read-only, as runc does (see docs/SECURITY.md).
    bind(rootfs, &root_target, false)?;
    let mounts = dir.join("mounts");
    std::fs::create_dir(&mounts).map_err(io("creating", &mounts))?;
    for b in binds {
        let target = dir.join(b.share_path());
        if b.source.is_dir() {
            std::fs::create_dir(&target).map_err(io("creating", &target))?;
        } else {
            std::fs::File::create(&target).map_err(io("creating", &target))?;
        }
        bind(&b.source, &target, b.readonly)?;
    }
    // The guest may use what is in the share, but not add to its top level.
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .map_err(|source| ShareError::Mount {
        what: "remounting read-only",
        path: dir.display().to_string(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("runvm-share-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn read_only_binds_are_read_only_in_their_submounts_too() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let base = temp("ro");
        let (src, rootfs, dir) = (base.join("src"), base.join("rootfs"), base.join("share"));
        for d in [&src, &rootfs] {
            std::fs::create_dir_all(d).unwrap();
        }
        // Mount namespaces are per thread once unshared: all mounts vanish with it.
        let b = base.clone();
        let result = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            let none = None::<&str>;
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).unwrap();
            std::fs::create_dir_all(src.join("sub")).unwrap();
            mount(
                Some("t"),
                &src.join("sub"),
                Some("tmpfs"),
                MsFlags::empty(),
                none,
            )
            .unwrap();
            let binds = [ShareBind {
                index: 0,
                source: src.clone(),
                readonly: true,
            }];
            build(&dir, &rootfs, &binds).unwrap();
            let m = dir.join("mounts/0");
            let top = std::fs::write(m.join("f"), "x").map_err(|e| e.raw_os_error());
            let sub = std::fs::write(m.join("sub/f"), "x").map_err(|e| e.raw_os_error());
            let root = std::fs::write(dir.join("rootfs/f"), "x").is_ok();
            (top, sub, root)
        })
        .join()
        .unwrap();
        let _ = std::fs::remove_dir_all(&b);
        let erofs = Err(Some(libc::EROFS));
        assert_eq!((result.0, result.1), (erofs, erofs), "top and submount");
        assert!(result.2, "the rootfs stays writable");
    }
}
