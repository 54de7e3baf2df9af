//! A takeover of a namespace the test makes (a new network namespace of the test's own
//! thread, with a veth pair): what is read for the guest, what is added, frames through
//! the redirects both ways, a second takeover refused naming the owner, and nothing left
//! after release. Needs root and /dev/net/tun, and says so when it skips.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use agent_protocol::{IpPrefix, RouteConfig};
use rtnl::{LinkChange, RouteEntry, Rtnl};
use vmm::devices::virtio::net::{NetBackend, MAX_FRAME_LEN, VNET_HDR_LEN};

use super::takeover::{release, take_over, TakeoverError, TAP_NAME};
use super::tc;

const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
/// An ethertype for local experiments (IEEE 802), so no stack answers the frames.
const ETHERTYPE: u16 = 0x88b5;

fn unavailable() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces, taps, tc)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("needs /dev/net/tun");
    }
    None
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn frame(src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(src);
    f.extend(ETHERTYPE.to_be_bytes());
    f.extend(payload);
    f.resize(f.len().max(60), 0);
    f
}

/// A packet socket on interface `index` for frames of [`ETHERTYPE`].
fn packet_socket(index: u32) -> OwnedFd {
    let proto = ETHERTYPE.to_be();
    // SAFETY: plain socket creation; the descriptor is owned right after.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeros is a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: bind reads one sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads one timeval of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

/// The next frame of [`ETHERTYPE`] the tap gives, without its header.
fn read_tap(tap: &mut impl NetBackend) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = vec![0; MAX_FRAME_LEN];
    while Instant::now() < deadline {
        match tap.read_frame(&mut buf).unwrap() {
            Some(n) if n > VNET_HDR_LEN + 14 => {
                let f = &buf[VNET_HDR_LEN..n];
                if f[12..14] == ETHERTYPE.to_be_bytes() {
                    return f.to_vec();
                }
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    panic!("no frame reached the tap");
}

/// The frames `sock` receives until one equals `want` (it also sees what its interface
/// sends), or what it got last.
fn receive(sock: &OwnedFd, want: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    for _ in 0..16 {
        // SAFETY: recv writes at most the buffer's length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(
            n > 0,
            "nothing reached the peer: {}",
            std::io::Error::last_os_error()
        );
        if &buf[..n as usize] == want {
            break;
        }
    }
    buf.truncate(want.len());
    buf
}

fn setup(nl: &mut Rtnl) -> (u32, u32) {
    // A veth's peer is registered first: eth0, the one taken over, gets the lower index.
    nl.add_veth("peer0", "eth0").unwrap();
    let eth0 = nl.link_by_name("eth0").unwrap().unwrap().index;
    let peer = nl.link_by_name("peer0").unwrap().unwrap().index;
    let change = LinkChange {
        mac: Some(MAC),
        mtu: Some(1400),
        up: Some(true),
        ..LinkChange::default()
    };
    nl.set_link(eth0, &change).unwrap();
    let up = LinkChange {
        up: Some(true),
        ..LinkChange::default()
    };
    nl.set_link(peer, &up).unwrap();
    nl.add_address(eth0, ip("10.9.0.2"), 24).unwrap();
    let default = RouteEntry {
        destination: None,
        gateway: Some(ip("10.9.0.1")),
        metric: Some(100),
    };
    nl.add_route(eth0, &default).unwrap();
    (eth0, peer)
}

fn in_new_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let mut nl = Rtnl::new().unwrap();
    let (eth0, peer) = setup(&mut nl);
    let mut t = take_over("c1").unwrap().expect("nothing taken over");
    assert_eq!(t.interface, "eth0");
    let i = &t.config.interfaces[0];
    assert_eq!((i.name.as_str(), i.mac, i.mtu), ("eth0", MAC, 1400));
    let addr = IpPrefix {
        address: ip("10.9.0.2"),
        prefix_len: 24,
    };
    assert_eq!(i.addresses, vec![addr]);
    let default = RouteConfig {
        destination: None,
        gateway: Some(ip("10.9.0.1")),
        metric: Some(100),
    };
    assert_eq!(i.routes, vec![default]);
    let tap = nl.link_by_name(TAP_NAME).unwrap().expect("no tap");
    assert_eq!(tap.alias.as_deref(), Some("runvm:c1"));
    assert_eq!((tap.mtu, tap.up), (1400, true));
    assert!(tc::has_ingress(&mut nl, eth0).unwrap());

    // peer0 -> eth0's ingress -> the tap.
    let sock = packet_socket(peer);
    let to_guest = frame([2, 0, 0, 0, 0, 9], b"to the guest");
    // SAFETY: send reads the buffer given with its length.
    let sent = unsafe {
        libc::send(
            sock.as_raw_fd(),
            to_guest.as_ptr().cast(),
            to_guest.len(),
            0,
        )
    };
    assert_eq!(sent as usize, to_guest.len());
    assert_eq!(read_tap(&mut t.tap), to_guest);
    // The tap -> eth0 -> peer0.
    let from_guest = frame(MAC, b"from the guest");
    let mut with_header = vec![0u8; VNET_HDR_LEN];
    with_header.extend(&from_guest);
    t.tap.write_frame(&with_header).unwrap();
    assert_eq!(receive(&sock, &from_guest), from_guest);

    match take_over("c2") {
        Err(TakeoverError::Taken { interface, owner }) => {
            assert_eq!((interface.as_str(), owner.as_str()), ("eth0", "c1"));
        }
        other => panic!("a second takeover: {other:?}"),
    }
    assert!(
        tc::has_ingress(&mut nl, eth0).unwrap(),
        "the refusal broke the first"
    );
    drop(t);
    release("eth0").unwrap();
    assert!(
        !tc::has_ingress(&mut nl, eth0).unwrap(),
        "ingress qdisc left"
    );
    assert!(nl.link_by_name(TAP_NAME).unwrap().is_none(), "tap left");
}

#[test]
fn a_namespace_is_taken_over_wired_both_ways_and_released() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    // The thread's namespace goes with the thread.
    std::thread::spawn(in_new_netns).join().unwrap();
}

#[test]
fn an_interface_gone_since_create_fails_the_takeover() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let ns = super::netns::Netns::open("/proc/thread-self/ns/net".as_ref()).unwrap();
        let r = super::take_over("c1", &ns, Some("eth0"), |_| Ok(()));
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("interface eth0 of the network namespace is gone"),
            "{e}"
        );
    })
    .join()
    .unwrap();
}

#[test]
fn a_namespace_with_loopback_only_is_left_alone() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        assert!(take_over("c1").unwrap().is_none());
        let mut nl = Rtnl::new().unwrap();
        assert_eq!(nl.links().unwrap().len(), 1, "something was added");
    })
    .join()
    .unwrap();
}

#[test]
fn the_runtimes_own_namespace_is_told_from_another() {
    let own = super::netns::Netns::open("/proc/self/ns/net".as_ref()).unwrap();
    assert!(own.is_own());
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let other = super::netns::Netns::open("/proc/thread-self/ns/net".as_ref()).unwrap();
        assert!(
            !other.is_own(),
            "a new namespace taken for the runtime's own"
        );
    })
    .join()
    .unwrap();
}
