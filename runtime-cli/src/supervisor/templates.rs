//! The container's VM and templates: the template of its shape, loaded (and its files
//! opened) before the VMM enters its jail, and word left in the state directory when a
//! template was refused or could not be restored, for `create` to act on.

use super::SupervisorConfig;
use crate::state::files;

/// The template of this container's VM shape, when templates are on and a usable one
/// exists (it is marked used). A refused one is logged: the VM boots instead. What
/// `create` must do about it (make a missing template, move a refused one aside) is
/// left in the state directory, so that `create` never computes the shape again.
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
    let key = shape.key();
    match store.load(&shape) {
        Ok(Some(t)) => {
            store.touch(&key);
            Some(t)
        }
        Ok(None) => {
            log::info!(
                "container {}: no template of its VM's shape yet",
                cfg.state.id
            );
            leave_word(cfg, files::TEMPLATE_MISSING, &format!("{key}\n"));
            None
        }
        Err(e) => {
            log::warn!(
                "container {}: template refused ({e}): booting instead",
                cfg.state.id
            );
            note_refused(cfg, &store.path(&key), &e.to_string());
            None
        }
    }
}

/// Leaves word in the state directory that the template at `dir` was refused: its key
/// and which one it was (its directory's device and inode, so that a template made
/// since is never taken for it), for `create` to move it aside and have it made again.
pub(super) fn note_refused(cfg: &SupervisorConfig, dir: &std::path::Path, why: &str) {
    use std::os::unix::fs::MetadataExt;
    let (Some(key), Ok(meta)) = (dir.file_name(), std::fs::symlink_metadata(dir)) else {
        return;
    };
    let key = key.to_string_lossy();
    let text = format!("{key} {} {}\n{why}\n", meta.dev(), meta.ino());
    leave_word(cfg, files::TEMPLATE_REFUSED, &text);
}

fn leave_word(cfg: &SupervisorConfig, name: &str, text: &str) {
    if let Err(e) = crate::state::write_private(&cfg.state.file(name), text.as_bytes()) {
        log::debug!("recording {name}: {e}");
    }
}
