//! The traffic-control plumbing of a takeover: an ingress qdisc on each side and a u32
//! filter matching every frame whose action, mirred egress redirect, hands it to the
//! other side (Kata's "tc redirect" model). Frames that reach the container's interface
//! go to the tap, and so to the guest; frames the guest sends leave through the
//! interface. The namespace's own stack sees neither.

use rtnl::packet::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use rtnl::packet::RouteNetlinkMessage;
use rtnl::{Rtnl, RtnlError, NLM_F_CREATE, NLM_F_EXCL};

/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// Filter priority.
const PRIORITY: u32 = 1;

fn ingress_message(index: u32) -> TcMessage {
    let mut m = TcMessage::with_index(index as i32);
    m.header.handle = INGRESS_HANDLE;
    m.header.parent = TcHandle::INGRESS;
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    m
}

/// Adds an ingress qdisc to interface `index`; fails if it has one.
pub fn add_ingress(nl: &mut Rtnl, index: u32, name: &str) -> Result<(), RtnlError> {
    let op = format!("adding an ingress qdisc to {name}");
    let m = RouteNetlinkMessage::NewQueueDiscipline(ingress_message(index));
    nl.request(&op, m, NLM_F_CREATE | NLM_F_EXCL)
}

/// Removes the ingress qdisc of interface `index` (and its filters); one that is not
/// there is no error.
pub fn remove_ingress(nl: &mut Rtnl, index: u32, name: &str) -> Result<(), RtnlError> {
    let op = format!("removing the ingress qdisc of {name}");
    let m = RouteNetlinkMessage::DelQueueDiscipline(ingress_message(index));
    match nl.request(&op, m, 0) {
        Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EINVAL)) => Ok(()),
        r => r,
    }
}

/// The mirred action that sends a frame out of interface `to`.
fn redirect_action(to: u32) -> TcAction {
    let mut mirror = TcMirror::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    action
}

/// A filter on `from`'s ingress qdisc redirecting every frame out of `to`.
pub fn redirect(nl: &mut Rtnl, from: u32, to: u32, name: &str) -> Result<(), RtnlError> {
    let mut m = TcMessage::with_index(from as i32);
    m.header.parent = INGRESS_HANDLE;
    // tcm_info: the priority in the upper half, the protocol (network order) below.
    let all = u32::from((libc::ETH_P_ALL as u16).to_be());
    m.header.info = (PRIORITY << 16) | all;
    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = 1;
    sel.keys = vec![TcU32Key::default()];
    m.attributes.push(TcAttribute::Kind("u32".into()));
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(sel)),
        TcOption::U32(TcFilterU32Option::Action(vec![redirect_action(to)])),
    ]));
    let op = format!("redirecting {name}'s traffic");
    nl.request(
        &op,
        RouteNetlinkMessage::NewTrafficFilter(m),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// Whether interface `index` has an ingress qdisc (for the tests' checks).
#[cfg(test)]
pub fn has_ingress(nl: &mut Rtnl, index: u32) -> Result<bool, RtnlError> {
    let answers = nl.dump(
        "listing qdiscs",
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
    )?;
    Ok(answers.iter().any(|m| match m {
        RouteNetlinkMessage::NewQueueDiscipline(q) => {
            q.header.index == index as i32
                && q.attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(k) if k == "ingress"))
        }
        _ => false,
    }))
}
