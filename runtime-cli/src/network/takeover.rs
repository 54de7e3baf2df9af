//! Taking over a container's network namespace for its VM (run in a thread inside that
//! namespace): the first Ethernet interface is the one wired; its MAC, MTU, addresses and
//! routes are read for the guest; a tap is created beside it, marked with the container
//! that owns it, and both are joined by tc redirects. A failure on the way removes what
//! was added. The interface keeps its addresses: the namespace's own stack no longer
//! receives its frames.

use agent_protocol::{InterfaceConfig, IpPrefix, NetworkConfig, RouteConfig};
use rtnl::{Link, LinkChange, Rtnl, RtnlError};
use vmm::devices::virtio::net::tap::{Tap, TapError};

use super::tc;

/// Name of the tap in the container's namespace.
pub const TAP_NAME: &str = "runvm-tap0";
/// The tap's alias is this followed by the id of the container whose VM it serves.
pub const OWNER_PREFIX: &str = "runvm:";

/// Errors taking over a namespace.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(transparent)]
    Netlink(#[from] RtnlError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("interface {interface} is already the network of runvm container {owner}'s VM: a VM cannot share its interface")]
    Taken { interface: String, owner: String },
    #[error("the tap {0} vanished while it was set up")]
    TapGone(String),
    #[error("interface {0} of the network namespace is gone since create")]
    Vanished(String),
}

/// A namespace taken over: the tap, wired to `interface`, and what the guest must know.
#[derive(Debug)]
pub struct Takeover {
    pub tap: Tap,
    pub interface: String,
    pub config: NetworkConfig,
}

/// The interface a VM takes, and the others it cannot: Ethernet interfaces with an
/// address (not the all-zero one of the fallback devices some tunnel modules put in every
/// namespace), those that are up first, then by index.
fn choose(links: &[Link]) -> (Option<&Link>, Vec<&Link>) {
    let mut ethernet: Vec<&Link> = links
        .iter()
        .filter(|l| !l.loopback && l.name != TAP_NAME)
        .filter(|l| l.mac.is_some_and(|m| m != [0; 6]))
        .collect();
    ethernet.sort_by_key(|l| (!l.up, l.index));
    let mut it = ethernet.into_iter();
    let first = it.next();
    (first, it.collect())
}

/// The interface a takeover of the calling thread's namespace would wire now.
pub fn candidate() -> Result<Option<String>, RtnlError> {
    let links = Rtnl::new()?.links()?;
    Ok(choose(&links).0.map(|l| l.name.clone()))
}

/// Takes over the calling thread's namespace for container `owner`. `None`: it has no
/// interface but loopback.
pub fn take_over(owner: &str) -> Result<Option<Takeover>, TakeoverError> {
    let mut nl = Rtnl::new()?;
    let links = nl.links()?;
    let (first, others) = choose(&links);
    if let Some(tap) = links.iter().find(|l| l.name == TAP_NAME) {
        let alias = tap.alias.as_deref().unwrap_or("");
        return Err(TakeoverError::Taken {
            interface: first.map_or(TAP_NAME.into(), |l| l.name.clone()),
            owner: alias.strip_prefix(OWNER_PREFIX).unwrap_or("?").into(),
        });
    }
    let Some(iface) = first else {
        return Ok(None);
    };
    for other in others {
        log::warn!(
            "container {owner}: interface {} is not wired into the VM: a runvm VM has one network interface",
            other.name
        );
    }
    let config = interface_config(&mut nl, iface)?;
    let tap = Tap::create(TAP_NAME)?;
    let mut added = false;
    match wire(&mut nl, iface, owner, &mut added) {
        Ok(()) => Ok(Some(Takeover {
            tap,
            interface: iface.name.clone(),
            config,
        })),
        Err(e) => {
            // The tap (and its qdisc) goes with its descriptor; the interface's qdisc
            // goes if this takeover added it (one that was there stays).
            if added {
                let _ = tc::remove_ingress(&mut nl, iface.index, &iface.name);
            }
            Err(e)
        }
    }
}

fn interface_config(nl: &mut Rtnl, iface: &Link) -> Result<NetworkConfig, RtnlError> {
    let addresses = nl
        .addresses(iface.index)?
        .into_iter()
        .map(|(address, prefix_len)| IpPrefix {
            address,
            prefix_len,
        })
        .collect();
    let routes = nl
        .routes(iface.index)?
        .into_iter()
        .map(|r| RouteConfig {
            destination: r.destination.map(|(address, prefix_len)| IpPrefix {
                address,
                prefix_len,
            }),
            gateway: r.gateway,
            metric: r.metric,
        })
        .collect();
    Ok(NetworkConfig {
        interfaces: vec![InterfaceConfig {
            name: iface.name.clone(),
            mac: iface.mac.unwrap_or_default(),
            mtu: iface.mtu,
            addresses,
            routes,
        }],
    })
}

/// Marks and raises the tap, then redirects both ways between it and `iface`; `added`
/// says whether `iface`'s ingress qdisc is this call's.
fn wire(nl: &mut Rtnl, iface: &Link, owner: &str, added: &mut bool) -> Result<(), TakeoverError> {
    let tap = nl
        .link_by_name(TAP_NAME)?
        .ok_or_else(|| TakeoverError::TapGone(TAP_NAME.into()))?;
    let change = LinkChange {
        up: Some(true),
        mtu: Some(iface.mtu),
        alias: Some(format!("{OWNER_PREFIX}{owner}")),
        ..LinkChange::default()
    };
    nl.set_link(tap.index, &change)?;
    tc::add_ingress(nl, iface.index, &iface.name)?;
    *added = true;
    tc::add_ingress(nl, tap.index, TAP_NAME)?;
    tc::redirect(nl, iface.index, tap.index, &iface.name)?;
    tc::redirect(nl, tap.index, iface.index, TAP_NAME)?;
    Ok(())
}

/// Undoes a takeover of interface `name` in the calling thread's namespace once its VM
/// is gone (the tap went with it): removes the interface's ingress qdisc, unless a tap
/// is there again (another VM's takeover, which owns the qdisc now).
pub fn release(name: &str) -> Result<(), RtnlError> {
    let mut nl = Rtnl::new()?;
    let links = nl.links()?;
    if links.iter().any(|l| l.name == TAP_NAME) {
        return Ok(());
    }
    match links.iter().find(|l| l.name == name) {
        Some(iface) => tc::remove_ingress(&mut nl, iface.index, name),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, mac: bool, loopback: bool) -> Link {
        Link {
            index,
            name: name.into(),
            mac: mac.then_some([2, 0, 0, 0, 0, index as u8]),
            loopback,
            ..Link::default()
        }
    }

    #[test]
    fn the_first_ethernet_interface_is_chosen_and_the_rest_named() {
        let links = [
            link(1, "lo", false, true),
            link(2, "eth0", true, false),
            link(3, "tun0", false, false),
            link(4, "eth1", true, false),
        ];
        let (first, others) = choose(&links);
        assert_eq!(first.unwrap().name, "eth0");
        assert_eq!(
            others.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            ["eth1"]
        );
        let (none, rest) = choose(&links[..1]);
        assert!(none.is_none() && rest.is_empty());
        // A fallback tunnel device (all-zero address) is never chosen; an interface that
        // is up comes before one that is down.
        let mut gretap = link(2, "gretap0", true, false);
        gretap.mac = Some([0; 6]);
        let mut down = link(3, "eth1", true, false);
        down.up = false;
        let mut up = link(4, "eth0", true, false);
        up.up = true;
        let links = [link(1, "lo", false, true), gretap, down, up];
        let (first, others) = choose(&links);
        assert_eq!(first.unwrap().name, "eth0");
        assert_eq!(
            others.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            ["eth1"]
        );
    }
}
