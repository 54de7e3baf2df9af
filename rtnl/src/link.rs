//! Links, addresses and routes: reading an interface's configuration and applying one.

use std::net::IpAddr;

use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{Rtnl, RtnlError, NLM_F_CREATE, NLM_F_EXCL};

/// One network interface as the kernel describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Hardware address (Ethernet interfaces).
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
    /// `ip link set ... alias`.
    pub alias: Option<String>,
    /// The link kind (`veth`, `tun`, `bridge`, ...), when it has one.
    pub kind: Option<String>,
}

/// What to change on a link; `None` leaves a property as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkChange {
    pub name: Option<String>,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub up: Option<bool>,
    pub alias: Option<String>,
}

/// A route through one interface: to `destination` (the default route without one),
/// through `gateway` (directly on the link without one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// The route's priority (`metric`), when it has one.
    pub metric: Option<u32>,
}

fn link_from(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        up: m.header.flags.contains(LinkFlags::Up),
        loopback: m.header.flags.contains(LinkFlags::Loopback),
        ..Link::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(mac) => l.mac = <[u8; 6]>::try_from(mac.as_slice()).ok(),
            LinkAttribute::Mtu(mtu) => l.mtu = *mtu,
            LinkAttribute::IfAlias(alias) => l.alias = Some(alias.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(kind_name(k));
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Veth => "veth".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Dummy => "dummy".into(),
        InfoKind::Vlan => "vlan".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl Rtnl {
    /// Every interface of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, RtnlError> {
        let answers = self.dump(
            "listing interfaces",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
        )?;
        Ok(answers
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })
            .collect())
    }

    /// The interface called `name`.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, RtnlError> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    /// Applies `change` to interface `index`.
    pub fn set_link(&mut self, index: u32, change: &LinkChange) -> Result<(), RtnlError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if let Some(up) = change.up {
            m.header.change_mask = LinkFlags::Up;
            m.header.flags = if up {
                LinkFlags::Up
            } else {
                LinkFlags::empty()
            };
        }
        if let Some(n) = &change.name {
            m.attributes.push(LinkAttribute::IfName(n.clone()));
        }
        if let Some(mac) = change.mac {
            m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        if let Some(mtu) = change.mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(alias) = &change.alias {
            m.attributes.push(LinkAttribute::IfAlias(alias.clone()));
        }
        let op = format!("configuring interface {index}");
        self.request(&op, RouteNetlinkMessage::SetLink(m), 0)
    }

    /// Creates the veth pair `name` and `peer`.
    pub fn add_veth(&mut self, name: &str, peer: &str) -> Result<(), RtnlError> {
        let mut p = LinkMessage::default();
        p.attributes.push(LinkAttribute::IfName(peer.into()));
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
        ]));
        let op = format!("creating veth pair {name}/{peer}");
        self.request(
            &op,
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Removes interface `index`.
    pub fn delete_link(&mut self, index: u32) -> Result<(), RtnlError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        let op = format!("removing interface {index}");
        self.request(&op, RouteNetlinkMessage::DelLink(m), 0)
    }

    /// The addresses of interface `index` but link-local and host-scope ones (which each
    /// side makes for itself), as (address, prefix length).
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>, RtnlError> {
        let answers = self.dump(
            "listing addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        )?;
        let mut out = Vec::new();
        for m in answers {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.index != index || a.header.scope != AddressScope::Universe {
                continue;
            }
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS the peer's on
            // point-to-point links and the same otherwise.
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                out.push((ip, a.header.prefix_len));
            }
        }
        Ok(out)
    }

    /// Gives interface `index` the address `ip`/`prefix`. An IPv6 address is usable at
    /// once (no duplicate address detection): runvm gives an interface the addresses
    /// another one already held.
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix: u8) -> Result<(), RtnlError> {
        let mut m = AddressMessage::default();
        m.header.family = family(&ip);
        m.header.prefix_len = prefix;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(ip));
        m.attributes.push(AddressAttribute::Address(ip));
        if ip.is_ipv6() {
            m.header.flags = AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        let op = format!("adding address {ip}/{prefix}");
        self.request(
            &op,
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// The routes of the main table through interface `index` that were configured (not
    /// those the kernel derives from an address).
    pub fn routes(&mut self, index: u32) -> Result<Vec<RouteEntry>, RtnlError> {
        let answers = self.dump(
            "listing routes",
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
        )?;
        let mut out = Vec::new();
        for m in answers {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            let h = &r.header;
            if h.table != RouteHeader::RT_TABLE_MAIN
                || h.kind != RouteType::Unicast
                || h.protocol == RouteProtocol::Kernel
            {
                continue;
            }
            let mut oif = None;
            let mut entry = RouteEntry {
                destination: None,
                gateway: None,
                metric: None,
            };
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Destination(d) => {
                        entry.destination = ip_of(d).map(|ip| (ip, h.destination_prefix_length))
                    }
                    RouteAttribute::Gateway(g) => entry.gateway = ip_of(g),
                    RouteAttribute::Priority(p) => entry.metric = Some(*p),
                    _ => {}
                }
            }
            if oif == Some(index) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Adds `route` through interface `index` to the main table.
    pub fn add_route(&mut self, index: u32, route: &RouteEntry) -> Result<(), RtnlError> {
        let any = route
            .destination
            .map(|(ip, _)| ip)
            .or(route.gateway)
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let mut m = RouteMessage::default();
        m.header.address_family = family(&any);
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.kind = RouteType::Unicast;
        m.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if let Some((ip, prefix)) = route.destination {
            m.header.destination_prefix_length = prefix;
            m.attributes.push(RouteAttribute::Destination(ip.into()));
        }
        if let Some(gw) = route.gateway {
            m.attributes.push(RouteAttribute::Gateway(gw.into()));
        }
        if let Some(metric) = route.metric {
            m.attributes.push(RouteAttribute::Priority(metric));
        }
        m.attributes.push(RouteAttribute::Oif(index));
        let op = format!("adding route {route:?}");
        self.request(
            &op,
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }
}
