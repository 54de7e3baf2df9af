//! What the VMM keeps of root once its setup (namespaces, share mounts, cgroup) is done and
//! before it starts any thread, so every thread inherits it: only the capabilities the
//! virtio-fs backend needs to act on the share for the guest's users, none inheritable or
//! ambient, the rest gone from the bounding set too, and no_new_privs. Whatever a later
//! step of the VMM must do with more (say, wiring a network device at `start`) belongs
//! before this point or in a helper process that keeps what it needs.

use caps::{CapSet, Capability, CapsHashSet};

/// What the virtio-fs backend uses: files of any owner and mode (DAC_OVERRIDE,
/// DAC_READ_SEARCH, FOWNER, FSETID), ownership and device nodes the guest creates (CHOWN,
/// MKNOD), the guest caller's ids per request (SETUID, SETGID), file capabilities in
/// images (SETFCAP), immutable and append-only flags (LINUX_IMMUTABLE).
pub const KEPT: [Capability; 10] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETFCAP,
    Capability::CAP_LINUX_IMMUTABLE,
];

/// Why the VMM could not shed its privileges.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("dropping the VMM's capabilities: {0}")]
    Caps(#[from] caps::errors::CapsError),
    #[error("setting no_new_privs on the VMM: {0}")]
    NoNewPrivs(#[source] nix::Error),
}

/// Drops every capability but [`KEPT`] from this thread (and so from the threads it
/// starts later), and sets no_new_privs.
pub fn drop_privileges() -> Result<(), PrivilegeError> {
    let kept: CapsHashSet = KEPT.into_iter().collect();
    let permitted = caps::read(None, CapSet::Permitted)?;
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for c in caps::runtime::thread_all_supported() {
            if !kept.contains(&c) {
                caps::drop(None, CapSet::Bounding, c)?;
            }
        }
    }
    let keep: CapsHashSet = permitted.intersection(&kept).copied().collect();
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    nix::sys::prctl::set_no_new_privs().map_err(PrivilegeError::NoNewPrivs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_kept_capabilities_remain_in_every_set() {
        // Capabilities are per thread: this thread alone changes.
        let sets = std::thread::spawn(|| {
            drop_privileges().unwrap();
            let read = |s| caps::read(None, s).unwrap();
            (
                read(CapSet::Effective),
                read(CapSet::Permitted),
                read(CapSet::Inheritable),
                read(CapSet::Bounding),
                nix::sys::prctl::get_no_new_privs().unwrap(),
            )
        })
        .join()
        .unwrap();
        let kept: CapsHashSet = KEPT.into_iter().collect();
        let (eff, prm, inh, bnd, nnp) = sets;
        assert!(
            eff.is_subset(&kept) && prm.is_subset(&kept),
            "{eff:?} {prm:?}"
        );
        assert!(inh.is_empty(), "{inh:?}");
        if nix::unistd::geteuid().is_root() {
            assert_eq!(bnd, kept, "bounding set");
            assert_eq!(eff, kept, "root keeps exactly these");
        }
        assert!(nnp, "no_new_privs");
    }
}
