//! The container's network, as its VM takes it over at `start`, once the prestart and
//! createRuntime hooks (Docker's among them) and CNI have configured the namespace.
//!
//! Every VM has one virtio-net device from boot with no backend. At `start`, in the
//! VMM's network namespace (the container's), `takeover` wires that namespace's first
//! Ethernet interface to a new tap with tc redirects and reads its configuration; the
//! tap's descriptor goes to the VMM over its control socket (SCM_RIGHTS), which attaches
//! it to the device and has the agent configure the guest's interface the same way.
//!
//! The cases between: a spec without a network namespace (runc would share the host's
//! stack; a VM cannot): loopback only, with a warning. A namespace with loopback only
//! (`--network none`, a new empty one): loopback only. Several interfaces: the first is
//! wired, each other one named in a warning. A namespace whose interface another runvm
//! VM already took: `start` fails naming that container, which keeps its network.

pub mod netns;
pub mod takeover;
mod tc;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use netns::{Netns, NetnsError};
use takeover::{Takeover, TakeoverError};

/// What `state.json` keeps of the container's network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkState {
    /// The spec gives the container a network namespace (new or joined).
    #[serde(default)]
    pub own_namespace: bool,
    /// The namespace's path when the spec names one (it outlives the VMM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_path: Option<PathBuf>,
    /// The interface a takeover would have wired when `create` ended (hooks had run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_at_create: Option<String>,
    /// The interface the VM took over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

impl NetworkState {
    /// Whether there is nothing to record.
    pub fn is_empty(&self) -> bool {
        self == &NetworkState::default()
    }
}

/// Errors wiring the container's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("container {id}: {source}")]
    Netns {
        id: String,
        #[source]
        source: NetnsError,
    },
    #[error("container {id}: {source}")]
    Takeover {
        id: String,
        #[source]
        source: TakeoverError,
    },
    #[error("container {id}: handing the network to the VM: {reason}")]
    Attach { id: String, reason: String },
}

/// The interface a takeover of `ns` would wire now (recorded at the end of `create`).
pub fn candidate(id: &str, ns: &Netns) -> Option<String> {
    match ns.run(takeover::candidate) {
        Ok(Ok(name)) => name,
        Ok(Err(e)) => {
            log::debug!("container {id}: {e}");
            None
        }
        Err(e) => {
            log::debug!("container {id}: {e}");
            None
        }
    }
}

/// Takes over the network namespace `ns` for container `id` and hands the result to
/// `attach` (the VMM). Returns the interface wired, `None` when there was none; an
/// interface `expected` that is gone is an error. A failure leaves nothing in the
/// namespace.
pub fn take_over(
    id: &str,
    ns: &Netns,
    expected: Option<&str>,
    attach: impl FnOnce(Takeover) -> Result<(), String>,
) -> Result<Option<String>, NetworkError> {
    let netns = |source| NetworkError::Netns {
        id: id.into(),
        source,
    };
    let taken = ns
        .run(|| takeover::take_over(id))
        .map_err(netns)?
        .map_err(|source| NetworkError::Takeover {
            id: id.into(),
            source,
        })?;
    let Some(t) = taken else {
        if let Some(name) = expected {
            return Err(NetworkError::Takeover {
                id: id.into(),
                source: TakeoverError::Vanished(name.into()),
            });
        }
        log::debug!("container {id}: its network namespace has loopback only");
        return Ok(None);
    };
    let name = t.interface.clone();
    if let Err(reason) = attach(t) {
        release(id, ns, &name);
        return Err(NetworkError::Attach {
            id: id.into(),
            reason,
        });
    }
    Ok(Some(name))
}

/// Removes what a takeover of `interface` left in `ns` once the VM is gone.
pub fn release(id: &str, ns: &Netns, interface: &str) {
    match ns.run(|| takeover::release(interface)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("container {id}: {e}"),
        Err(e) => log::warn!("container {id}: {e}"),
    }
}

/// The warning for a container without a network namespace of its own.
pub fn warn_no_namespace(id: &str) {
    log::warn!(
        "container {id} has no network namespace of its own: its VM has loopback only (a VM cannot share the host's network)"
    );
}
