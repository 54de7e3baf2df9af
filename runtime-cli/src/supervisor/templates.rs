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
    let found = crate::sandbox::shape(config, profile, true)
        .map_err(|e| e.to_string())
        .and_then(|shape| store.load(&shape).map_err(|e| e.to_string()));
    match found {
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
            note_refused(cfg, &e);
            None
        }
    }
}

/// Leaves word in the state directory that this VM's template was refused, so that
/// `create` moves it aside and has it made again.
pub(super) fn note_refused(cfg: &SupervisorConfig, why: &str) {
    let path = cfg.state.file(files::TEMPLATE_REFUSED);
    if let Err(e) = crate::state::write_private(&path, format!("{why}\n").as_bytes()) {
        log::debug!("recording a refused template: {e}");
    }
}
