//! The virtio-fs backend: fuse-backend-rs's passthrough file system over one host
//! directory (the VM's share), and the settings that keep the guest inside it.
//!
//! Containment rests on three things: the passthrough file system resolves every name one
//! component at a time relative to an open directory (`..` at the root stays at the root,
//! names with `/` are refused) and never follows symlinks on the host; the share's mounts
//! are `nodev,nosuid` on the host (set up by whoever builds the share), so device nodes
//! and set-id bits the guest creates there mean nothing to the host; and no path outside
//! the share is ever opened.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

/// The file system a runvm share is served with.
pub type ShareFs = PassthroughFs<()>;

/// Errors creating the backend.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("share directory {path} cannot be served: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A FUSE server exporting `root`.
///
/// The root directory is opened now; what is later mounted inside it (the container's
/// rootfs and bind-mount sources) becomes visible to the guest, so the share can be
/// filled after the VM has started, until the guest first uses it.
pub fn share_server(root: &Path) -> Result<Arc<Server<ShareFs>>, ShareError> {
    let path = root.to_string_lossy().into_owned();
    let err = |source| ShareError::Open {
        path: path.clone(),
        source,
    };
    let cfg = Config {
        root_dir: path.clone(),
        // Container images carry capabilities and ACLs in xattrs.
        xattr: true,
        do_import: true,
        // The host may change files too (bind mounts, `docker cp`): short caches, and
        // writes go through at once so the host sees them when the process exits.
        cache_policy: CachePolicy::Auto,
        writeback: false,
        attr_timeout: Duration::from_secs(1),
        entry_timeout: Duration::from_secs(1),
        // One share spans several host file systems (bind mounts): tell inodes apart
        // by mount too.
        enable_mntid: true,
        ..Default::default()
    };
    let fs = PassthroughFs::<()>::new(cfg).map_err(err)?;
    fs.import().map_err(err)?;
    Ok(Arc::new(Server::new(fs)))
}
