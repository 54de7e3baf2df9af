//! The VMM's half of the network takeover (see `crate::network`): the tap goes to the
//! VM's network device, the interface's configuration to the guest agent. A detached VMM
//! gets both from `runvm start` over its control socket; the VMM of a foreground `run`
//! (root, already in the container's namespace) takes the namespace over itself and
//! gives back what the takeover added when the VM ends.

use std::os::unix::net::UnixStream;

use agent_protocol::NetworkConfig;
use vmm::devices::virtio::net::tap::Tap;

use super::{Shared, SupervisorConfig, AGENT_CALL_TIMEOUT};
use crate::control::{self, ControlResponse};
use crate::network::{self, netns::Netns};
use crate::translate::VmmNamespace;

/// Attaches `tap` to the network device and has the agent configure the guest.
fn attach(shared: &Shared, tap: Tap, config: &NetworkConfig) -> Result<(), String> {
    let net = shared.net.get().ok_or("the VM is not running")?;
    net.attach(Box::new(tap)).map_err(|e| e.to_string())?;
    let configured = shared
        .client
        .get()
        .ok_or_else(|| "the guest agent is not up".to_string())
        .and_then(|client| {
            let mut c = client
                .control_within(AGENT_CALL_TIMEOUT)
                .map_err(|e| e.to_string())?;
            c.network(config).map_err(|e| e.to_string())
        });
    if let Err(e) = configured {
        // The tap cannot be taken back from the device: a container whose network is
        // half set up does not run.
        shared.stopper.stop(libc::SIGKILL);
        return Err(format!("{e}; the container is stopped"));
    }
    Ok(())
}

/// A control connection's `network` request, whose tap follows the request on `s`.
pub(super) fn attach_received(
    shared: &Shared,
    s: &UnixStream,
    config: &NetworkConfig,
) -> ControlResponse {
    let result = control::receive_fd(s)
        .ok_or_else(|| "no tap descriptor came with the request".to_string())
        .and_then(|fd| Tap::from_fd(fd).map_err(|e| e.to_string()))
        .and_then(|tap| attach(shared, tap, config));
    match result {
        Ok(()) => ControlResponse::Ok,
        Err(message) => ControlResponse::Error { message },
    }
}

/// A foreground VMM's takeover of its own namespace; the interface wired, if any.
pub(super) fn take_over_here(
    cfg: &SupervisorConfig,
    shared: &Shared,
) -> Result<Option<String>, String> {
    let id = &cfg.state.id;
    if cfg.plan.namespaces.network.is_none() {
        network::warn_no_namespace(id);
        return Ok(None);
    }
    let ns = Netns::open("/proc/self/ns/net".as_ref()).map_err(|e| e.to_string())?;
    network::take_over(id, &ns, None, |t| attach(shared, t.tap, &t.config))
        .map_err(|e| e.to_string())
}

/// Removes what [`take_over_here`] added to a namespace that outlives the VM.
pub(super) fn release_here(cfg: &SupervisorConfig, interface: &str) {
    if let Some(VmmNamespace::Join(_)) = &cfg.plan.namespaces.network {
        if let Ok(ns) = Netns::open("/proc/self/ns/net".as_ref()) {
            network::release(&cfg.state.id, &ns, interface);
        }
    }
}
