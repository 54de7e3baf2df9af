//! The confinement of a container process, applied by its helper (limits when it
//! prepares, the rest just before exec), in runc's order: no_new_privileges, the seccomp filter (here when it is a privileged
//! operation, i.e. without no_new_privileges), the bounding set, the switch to the
//! process's user with capabilities kept, the capability sets, and the seccomp filter (here,
//! as late as possible, with no_new_privileges). Everything that can fail on bad input
//! (capability names, the seccomp profile) is checked when the helper prepares, so a bad
//! spec fails `create`.

mod capabilities;
mod seccomp;

use agent_protocol::ProcessSpec;

pub use capabilities::CapabilitySets;
pub use seccomp::Filter;

use crate::spawn::{fail, ExecSettings, SpawnError};

/// Everything applied to a container process between the start and its exec.
#[derive(Debug)]
pub struct Confinement {
    settings: ExecSettings,
    caps: Option<CapabilitySets>,
    seccomp: Option<Filter>,
    no_new_privs: bool,
}

impl Confinement {
    /// Prepares the confinement of `process` with the container's `seccomp` profile.
    pub fn prepare(
        process: &ProcessSpec,
        seccomp: Option<&agent_protocol::Seccomp>,
    ) -> Result<Self, SpawnError> {
        let caps = process
            .capabilities
            .as_ref()
            .map(CapabilitySets::from_spec)
            .transpose()?;
        let seccomp = seccomp
            .map(Filter::compile)
            .transpose()
            .map_err(|e| fail(1, agent_protocol::error_line(&e)))?;
        Ok(Confinement {
            settings: ExecSettings::from_spec(process)?,
            caps,
            seccomp,
            no_new_privs: process.no_new_privileges,
        })
    }

    /// The umask, OOM score and resource limits, applied early: raising a limit needs the
    /// agent's privileges, which a user namespace would take away.
    pub fn apply_limits(&self) -> std::io::Result<()> {
        self.settings.apply_limits()
    }

    /// Applies the rest to the calling (single-threaded) process; next comes exec.
    pub fn apply(&self) -> Result<(), SpawnError> {
        let err = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| fail(1, format!("{what}: {e}"))
        };
        if self.no_new_privs {
            nix::sys::prctl::set_no_new_privs().map_err(|e| err("no_new_privileges")(e.into()))?;
        }
        if !self.no_new_privs {
            self.load_seccomp()?;
        }
        if let Some(c) = &self.caps {
            c.limit_bounding().map_err(err("capability bounding set"))?;
            caps::securebits::set_keepcaps(true).map_err(|e| fail(1, format!("keepcaps: {e}")))?;
        }
        self.settings.apply_user().map_err(err("switching user"))?;
        if let Some(c) = &self.caps {
            caps::securebits::set_keepcaps(false).map_err(|e| fail(1, format!("keepcaps: {e}")))?;
            c.apply().map_err(err("capabilities"))?;
        }
        if self.no_new_privs {
            self.load_seccomp()?;
        }
        Ok(())
    }

    fn load_seccomp(&self) -> Result<(), SpawnError> {
        match &self.seccomp {
            Some(f) => f
                .load()
                .map_err(|e| fail(1, format!("loading the seccomp filter: {e}"))),
            None => Ok(()),
        }
    }
}
