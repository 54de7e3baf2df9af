//! The container's VM and templates: the template of its shape, loaded (and its files
//! opened) before the VMM enters its jail, and word left in the state directory when a
//! template was refused or could not be restored, for `create` to act on.

use super::SupervisorConfig;
use crate::state::files;

/// The template of this container's VM shape, when templates are on and a usable one
/// exists. A refused one is logged: the VM boots instead.
pub(super) fn find(
    cfg: &SupervisorConfig,
    config: &vmm::VmConfig,
    profile: &vmm::HostProfile,
) -> Option<vmm::snapshot::Snapshot> {
    let store = crate::template::TemplateStore::new(cfg.templates.as_ref()?);
    let shape = match crate::sandbox::shape(config, profile, true) {
        Ok(shape) => shape,
        Err(e) => {
            log::warn!("container {}: no template ({e}): booting", cfg.state.id);
            return None;
        }
    };
    match store.load(&shape) {
        Ok(Some(t)) => Some(t),
        Ok(None) => {
            log::info!(
                "container {}: no template of its VM's shape yet",
                cfg.state.id
            );
            None
        }
        Err(e) => {
            log::warn!(
                "container {}: template refused ({e}): booting instead",
                cfg.state.id
            );
            note_refused(cfg, &store.path(&shape.key()), &e.to_string());
            None
        }
    }
}

/// Leaves word in the state directory that the template at `dir` was refused (which
/// one: its directory's device and inode, so that a template made since is never taken
/// for it), for `create` to move it aside and have it made again.
pub(super) fn note_refused(cfg: &SupervisorConfig, dir: &std::path::Path, why: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    let path = cfg.state.file(files::TEMPLATE_REFUSED);
    let text = format!("{} {}\n{why}\n", meta.dev(), meta.ino());
    if let Err(e) = crate::state::write_private(&path, text.as_bytes()) {
        log::debug!("recording a refused template: {e}");
    }
}
