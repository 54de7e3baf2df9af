//! A process's capability sets from OCI names, applied with the `caps` crate.

use caps::{CapSet, Capability, CapsHashSet};

use crate::spawn::{fail, SpawnError};

/// The five sets of a process.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CapabilitySets {
    bounding: CapsHashSet,
    effective: CapsHashSet,
    inheritable: CapsHashSet,
    permitted: CapsHashSet,
    ambient: CapsHashSet,
}

fn set_of(names: &[String]) -> Result<CapsHashSet, SpawnError> {
    names
        .iter()
        .map(|n| {
            n.parse::<Capability>()
                .map_err(|_| fail(1, format!("unknown capability {n:?}")))
        })
        .collect()
}

fn io(e: caps::errors::CapsError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl CapabilitySets {
    /// The sets `spec` names; an unknown name is an error.
    pub fn from_spec(spec: &agent_protocol::Capabilities) -> Result<Self, SpawnError> {
        Ok(CapabilitySets {
            bounding: set_of(&spec.bounding)?,
            effective: set_of(&spec.effective)?,
            inheritable: set_of(&spec.inheritable)?,
            permitted: set_of(&spec.permitted)?,
            ambient: set_of(&spec.ambient)?,
        })
    }

    /// Drops from the bounding set every capability the spec does not keep there (before
    /// the user switch, while the process still may).
    pub fn limit_bounding(&self) -> std::io::Result<()> {
        for c in caps::runtime::thread_all_supported() {
            if !self.bounding.contains(&c) {
                caps::drop(None, CapSet::Bounding, c).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Sets the effective, permitted, inheritable and ambient sets (after the user
    /// switch). Effective first: the permitted set may then shrink under it.
    pub fn apply(&self) -> std::io::Result<()> {
        caps::set(None, CapSet::Effective, &self.effective).map_err(io)?;
        caps::set(None, CapSet::Permitted, &self.permitted).map_err(io)?;
        caps::set(None, CapSet::Inheritable, &self.inheritable).map_err(io)?;
        caps::clear(None, CapSet::Ambient).map_err(io)?;
        for c in &self.ambient {
            caps::raise(None, CapSet::Ambient, *c).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_sets_and_unknown_ones_are_refused() {
        let spec = agent_protocol::Capabilities {
            bounding: vec!["CAP_CHOWN".into(), "CAP_NET_BIND_SERVICE".into()],
            effective: vec!["CAP_CHOWN".into()],
            ..Default::default()
        };
        let s = CapabilitySets::from_spec(&spec).unwrap();
        assert!(s.bounding.contains(&Capability::CAP_NET_BIND_SERVICE));
        assert_eq!(s.effective.len(), 1);
        assert!(s.ambient.is_empty());
        let bad = agent_protocol::Capabilities {
            permitted: vec!["CAP_TELEPORT".into()],
            ..Default::default()
        };
        let e = CapabilitySets::from_spec(&bad).unwrap_err();
        assert!(e.message.contains("CAP_TELEPORT"), "{}", e.message);
    }
}
