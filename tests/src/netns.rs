//! Network namespaces for tests, made with iproute2 and removed on drop, so no test
//! touches the host's network: a container's namespace and a peer's, joined by a veth
//! pair (`eth0` in the container's, `peer0` in the peer's) on a /24 of 10.200.0.0/16
//! and a /64 of fd72::/16 picked per test, with the peer as the container's default
//! gateway for both.

use std::path::PathBuf;
use std::process::Command;

/// Why network tests cannot run here, if they cannot.
pub fn netns_test_unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("network tests need root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("network tests need /dev/net/tun".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("network tests need iproute2's ip (apt-get install iproute2)".into()),
    }
}

/// Runs `ip` with `args`; its stdout, or why it failed.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces and the link between them.
#[derive(Debug)]
pub struct TestNet {
    pub container: String,
    pub peer: String,
    subnet: u16,
}

impl TestNet {
    /// Both namespaces, the veth pair with MTU `mtu`, addresses and the default route.
    pub fn new(tag: &str, mtu: u32) -> Result<Self, String> {
        use std::sync::atomic::{AtomicU16, Ordering};
        static N: AtomicU16 = AtomicU16::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let subnet = (std::process::id() as u16).wrapping_add(n.wrapping_mul(37)) % 250 + 1;
        let base = format!("rvt{}-{tag}", std::process::id() % 100_000);
        let net = TestNet {
            container: format!("{base}-c"),
            peer: format!("{base}-p"),
            subnet,
        };
        net.setup(mtu)?;
        Ok(net)
    }

    fn setup(&self, mtu: u32) -> Result<(), String> {
        let (c, p) = (self.container.as_str(), self.peer.as_str());
        let mtu = mtu.to_string();
        let c_addr = format!("{}/24", self.container_ip());
        let p_addr = format!("{}/24", self.peer_ip());
        let gw = self.peer_ip();
        let (c6, p6) = (
            format!("{}/64", self.container_ip6()),
            format!("{}/64", self.peer_ip6()),
        );
        let gw6 = self.peer_ip6();
        let steps: [&[&str]; 14] = [
            &["netns", "add", c],
            &["netns", "add", p],
            &[
                "-n", c, "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "peer0",
                "mtu", &mtu,
            ],
            &["-n", c, "link", "set", "peer0", "netns", p],
            &["-n", c, "addr", "add", &c_addr, "dev", "eth0"],
            &["-n", p, "addr", "add", &p_addr, "dev", "peer0"],
            &["-n", c, "link", "set", "eth0", "up"],
            &["-n", p, "link", "set", "peer0", "up"],
            &["-n", c, "link", "set", "lo", "up"],
            &["-n", p, "link", "set", "lo", "up"],
            &["-n", c, "route", "add", "default", "via", &gw],
            // Usable at once (no duplicate address detection).
            &["-n", c, "addr", "add", &c6, "dev", "eth0", "nodad"],
            &["-n", p, "addr", "add", &p6, "dev", "peer0", "nodad"],
            &["-n", c, "-6", "route", "add", "default", "via", &gw6],
        ];
        for s in steps {
            ip(s)?;
        }
        Ok(())
    }

    /// The container's address.
    pub fn container_ip(&self) -> String {
        format!("10.200.{}.2", self.subnet)
    }

    /// The peer's address (the container's gateway).
    pub fn peer_ip(&self) -> String {
        format!("10.200.{}.1", self.subnet)
    }

    /// The container's IPv6 address.
    pub fn container_ip6(&self) -> String {
        format!("fd72:{:x}::2", self.subnet)
    }

    /// The peer's IPv6 address (the container's IPv6 gateway).
    pub fn peer_ip6(&self) -> String {
        format!("fd72:{:x}::1", self.subnet)
    }

    /// The container namespace's path, for config.json.
    pub fn container_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.container))
    }

    /// A command run in the peer's namespace.
    pub fn in_peer(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.peer, program]);
        c
    }

    /// What the container's namespace holds: its links and the qdiscs of `eth0`.
    pub fn container_leftovers(&self) -> Result<(String, String), String> {
        let links = ip(&["-n", &self.container, "-o", "link", "show"])?;
        let out = Command::new("tc")
            .args(["-n", &self.container, "qdisc", "show", "dev", "eth0"])
            .output()
            .map_err(|e| format!("tc: {e}"))?;
        Ok((links, String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for ns in [&self.container, &self.peer] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
