//! The VM's network: loopback up at boot, and at `start` the VM's one interface
//! configured as the container's (the host read it from the container's network
//! namespace): its name, MAC, MTU, addresses and routes, then the link up and a short
//! wait for the carrier, so that the container's first packet is not lost.
//!
//! Only an agent that is the VM's init touches the network; one on a host refuses.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent_protocol::{InterfaceConfig, NetworkConfig};
use rtnl::{LinkChange, RouteEntry, Rtnl, RtnlError};

/// Longest wait for the interface's carrier once it is configured.
const CARRIER_WAIT: Duration = Duration::from_secs(2);

static IN_VM: AtomicBool = AtomicBool::new(false);

/// Errors configuring the network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Netlink(#[from] RtnlError),
    #[error("the VM has no network interface")]
    NoInterface,
    #[error("the VM has one network interface; {0} were asked for")]
    TooMany(usize),
    #[error("the agent configures a network only as a VM's init")]
    NotInVm,
}

/// Whether this agent is a VM's init (it brought the VM's loopback up).
pub fn in_vm() -> bool {
    IN_VM.load(Ordering::SeqCst)
}

/// Brings loopback up; from then on the agent may configure the VM's network.
pub fn init() -> Result<(), NetworkError> {
    IN_VM.store(true, Ordering::SeqCst);
    let mut nl = Rtnl::new()?;
    for l in nl.links()?.iter().filter(|l| l.loopback && !l.up) {
        nl.set_link(l.index, &up())?;
    }
    Ok(())
}

fn up() -> LinkChange {
    LinkChange {
        up: Some(true),
        ..LinkChange::default()
    }
}

/// Whether the guest kernel has IPv6.
fn has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Configures the VM's interface as `config` says.
pub fn configure(config: &NetworkConfig) -> Result<(), NetworkError> {
    if !IN_VM.load(Ordering::SeqCst) {
        return Err(NetworkError::NotInVm);
    }
    let iface = match config.interfaces.as_slice() {
        [] => return Ok(()),
        [one] => one,
        many => return Err(NetworkError::TooMany(many.len())),
    };
    let mut nl = Rtnl::new()?;
    let dev = nl
        .links()?
        .into_iter()
        .find(|l| !l.loopback && l.mac.is_some())
        .ok_or(NetworkError::NoInterface)?;
    // The interface is down until now, so it can be renamed.
    let change = LinkChange {
        name: (iface.name != dev.name).then(|| iface.name.clone()),
        mac: Some(iface.mac),
        mtu: Some(iface.mtu),
        ..LinkChange::default()
    };
    nl.set_link(dev.index, &change)?;
    nl.set_link(dev.index, &up())?;
    apply_addresses(&mut nl, dev.index, iface)?;
    wait_for_carrier(&iface.name);
    Ok(())
}

fn apply_addresses(nl: &mut Rtnl, index: u32, iface: &InterfaceConfig) -> Result<(), NetworkError> {
    let ipv6 = has_ipv6();
    let usable = |ip: &IpAddr| ip.is_ipv4() || ipv6;
    for a in iface.addresses.iter().filter(|a| usable(&a.address)) {
        nl.add_address(index, a.address, a.prefix_len)?;
    }
    // Routes on the link first: a gateway must be reachable when its route is added.
    let routes = iface.routes.iter().filter(|r| {
        let ip = r.gateway.or(r.destination.as_ref().map(|d| d.address));
        ip.is_none_or(|ip| usable(&ip))
    });
    let (direct, via): (Vec<_>, Vec<_>) = routes.partition(|r| r.gateway.is_none());
    for r in direct.into_iter().chain(via) {
        let entry = RouteEntry {
            destination: r.destination.as_ref().map(|d| (d.address, d.prefix_len)),
            gateway: r.gateway,
            metric: r.metric,
        };
        nl.add_route(index, &entry)?;
    }
    if !ipv6 && iface.addresses.iter().any(|a| a.address.is_ipv6()) {
        eprintln!(
            "runvm-agent: {}: IPv6 addresses left out: the guest kernel has no IPv6",
            iface.name
        );
    }
    Ok(())
}

fn wait_for_carrier(name: &str) {
    let path = format!("/sys/class/net/{name}/carrier");
    let deadline = Instant::now() + CARRIER_WAIT;
    while Instant::now() < deadline {
        if std::fs::read_to_string(&path).is_ok_and(|s| s.trim() == "1") {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("runvm-agent: {name}: no carrier after {CARRIER_WAIT:?}");
}
