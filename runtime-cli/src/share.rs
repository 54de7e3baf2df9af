//! The container share: one directory the VM sees over virtio-fs, assembled by the VMM
//! process in its own mount namespace so that nothing here is visible outside it and
//! everything vanishes with it:
//!
//! ```text
//! <state>/share            tmpfs, read-only once assembled
//!   rootfs                 the bundle's rootfs (rbind, nosuid,nodev)
//!   mounts/<n>             each bind-mount source (rbind, nosuid,nodev [,ro])
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
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(err("remounting"))
}

/// Assembles the share at `dir` (in the caller's private mount namespace).
pub fn build(dir: &Path, rootfs: &Path, binds: &[ShareBind]) -> Result<(), ShareError> {
    let io = |what: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| ShareError::Io { what, path, source }
    };
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
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
