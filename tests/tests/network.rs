//! Networking through real VMs, only in network namespaces the tests create (a container
//! namespace and a peer joined by a veth pair, `runvm_tests::netns`): a container
//! started with create/start takes over its namespace's interface (address, MAC, MTU,
//! default route), pings and connects to the peer over TCP and UDP (`net-bench udp`, a
//! static test program), and serves HTTP the peer fetches, 1 MiB over TCP among it; a second container in the same namespace is refused at start, naming
//! the first, which keeps working; a foreground `runvm run` takes its namespace over
//! itself. After each, no tap or qdisc is left in the namespace. Engines run inside a test
//! namespace too: dockerd's default bridge network (NAT, published ports), and
//! containerd's `ctr run --cni` with Debian's bridge plugin (the CNI configuration mounted
//! only in a private mount namespace, `runvm_tests::cni`), reached both ways.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use runvm_tests::clients::Engine;
use runvm_tests::netns::{netns_test_unavailable, TestNet};
use runvm_tests::{
    container_test_unavailable, fails_with, ok, runvm, runvm_to_files, skip_unless, ContainerGuard,
    TempDir, TestBundle,
};

const T: Duration = Duration::from_secs(300);
const QUICK: Duration = Duration::from_secs(60);
const MTU: u32 = 1400;

fn unavailable() -> Option<String> {
    container_test_unavailable()
        .or_else(netns_test_unavailable)
        .or_else(|| runvm_tests::static_test_bin("net-bench").err())
}

/// A bundle running `script` in the namespace of `net`, allowed to ping.
fn bundle(tag: &str, net: &TestNet, script: &str) -> TestBundle {
    let mut b = TestBundle::new(tag, &["sh", "-c", script]);
    let path = net.container_path().to_string_lossy().into_owned();
    b.edit(|c| {
        let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "network");
        ns.push(serde_json::json!({"type": "network", "path": path}));
        // A spec without capabilities keeps them all; one with a list needs NET_RAW.
        if let Some(caps) = c["process"].get_mut("capabilities") {
            for set in ["bounding", "effective", "permitted"] {
                if let Some(list) = caps.get_mut(set).and_then(|l| l.as_array_mut()) {
                    list.push("CAP_NET_RAW".into());
                }
            }
        }
    });
    b
}

/// Waits until `file` holds `needle`; returns its text.
fn wait_for(file: &Path, needle: &str, bound: Duration) -> String {
    let deadline = Instant::now() + bound;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {file:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A busybox `nc` listening in the peer's namespace; its output is what it received.
fn listen(net: &TestNet, args: &[&str]) -> Child {
    let busybox = runvm_tests::busybox().unwrap();
    net.in_peer(busybox.to_str().unwrap())
        .arg("nc")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A UDP socket bound in the peer's namespace (by a thread that enters it); the thread
/// answers the first datagram's text, or what went wrong.
fn udp_listen(net: &TestNet, port: u16) -> std::thread::JoinHandle<String> {
    let ns = std::fs::File::open(format!("/var/run/netns/{}", net.peer)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let bound = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| e.to_string())
            .and_then(|()| std::net::UdpSocket::bind(("0.0.0.0", port)).map_err(|e| e.to_string()));
        let sock = match bound {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(());
                return e;
            }
        };
        let _ = tx.send(());
        // Bound before the container is created: its VM may still boot for a while.
        sock.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 1500];
        match sock.recv(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) => format!("no datagram: {e}"),
        }
    });
    rx.recv().unwrap();
    worker
}

fn received(mut child: Child, bound: Duration) -> String {
    let deadline = Instant::now() + bound;
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// Runs busybox `applet` with `args` in the peer's namespace; its stdout if it succeeded.
fn peer(net: &TestNet, applet: &str, args: &[&str]) -> Result<String, String> {
    let busybox = runvm_tests::busybox().unwrap();
    let out = net
        .in_peer(busybox.to_str().unwrap())
        .arg(applet)
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The container took its namespace's IPv6 address and default route, and pinged the
/// peer over IPv6 (`PING6-OK` in its output `text`); the peer pings it back.
fn assert_ipv6(net: &TestNet, text: &str) {
    assert!(
        text.contains(&format!("{}/64", net.container_ip6())),
        "{text}"
    );
    assert!(
        text.contains(&format!("default via {}", net.peer_ip6())),
        "{text}"
    );
    assert!(text.contains("PING6-OK"), "{text}");
    let ip6 = net.container_ip6();
    peer(net, "ping", &["-6", "-c", "1", "-W", "10", &ip6])
        .expect("the peer cannot ping the container over IPv6");
}

fn assert_namespace_clean(net: &TestNet) {
    let (links, qdiscs) = net.container_leftovers().unwrap();
    assert!(!links.contains("runvm-tap"), "tap left:\n{links}");
    assert!(!qdiscs.contains("ingress"), "qdisc left:\n{qdiscs}");
}

#[test]
fn a_started_container_owns_its_namespace_interface_both_ways() {
    skip_unless!(unavailable());
    let net = TestNet::new("start", MTU).unwrap();
    let root = TempDir::new("root");
    let r = root.path();
    let _guard = ContainerGuard::new(r, &["net1", "net2"]);
    let (gw, gw6) = (net.peer_ip(), net.peer_ip6());
    let script = format!(
        "ip -o addr show eth0; ip route; ip -6 route; echo mtu=$(cat /sys/class/net/eth0/mtu) mac=$(cat /sys/class/net/eth0/address); \
         ping -c 1 -W 10 {gw} && echo PING-OK; ping -6 -c 1 -W 10 {gw6} && echo PING6-OK; \
         echo tcp-from-vm | nc {gw} 9001 && echo TCP-SENT; \
         /net-bench udp {gw}:9002 udp-from-vm; \
         mkdir -p /www && head -c 1048576 /dev/zero | tr '\\0' v > /www/big && echo served-by-vm > /www/index.html; \
         echo SERVING; httpd -f -p 8080 -h /www"
    );
    let b = bundle("net-start", &net, &script);
    let tool = runvm_tests::static_test_bin("net-bench").unwrap();
    std::fs::copy(tool, b.rootfs().join("net-bench")).unwrap();
    let tcp = listen(&net, &["-l", "-p", "9001"]);
    let udp = udp_listen(&net, 9002);
    let out = r.join("net1.out");
    let bp = b.path().to_string_lossy().into_owned();
    ok(
        &runvm_to_files(r, &["create", "--bundle", &bp, "net1"], &out, T),
        "create",
    );
    ok(&runvm(r, &["start", "net1"], QUICK), "start");
    let text = wait_for(&out, "SERVING", QUICK);
    let mac =
        runvm_tests::netns::ip(&["-n", &net.container, "-o", "link", "show", "eth0"]).unwrap();
    assert!(
        text.contains(&format!("{}/24", net.container_ip())),
        "{text}"
    );
    assert!(text.contains(&format!("default via {gw}")), "{text}");
    assert_ipv6(&net, &text);
    assert!(text.contains(&format!("mtu={MTU}")), "{text}");
    let guest_mac = text
        .split("mac=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        mac.contains(guest_mac),
        "guest MAC {guest_mac} is not the namespace's: {mac}"
    );
    assert!(text.contains("PING-OK"), "{text}");
    assert!(text.contains("TCP-SENT"), "{text}");
    assert_eq!(received(tcp, QUICK).trim(), "tcp-from-vm");
    assert_eq!(udp.join().unwrap().trim(), "udp-from-vm");
    let ip = net.container_ip();
    peer(&net, "ping", &["-c", "1", "-W", "10", &ip]).expect("the peer cannot ping the container");
    let web = format!("{ip}:8080");
    // httpd may still be starting.
    fetch_until(&net, &web, "index.html", "served-by-vm", QUICK);
    let big = http_get(&net, &web, "big").unwrap();
    assert!(
        big.len() == 1 << 20 && big.iter().all(|b| *b == b'v'),
        "1 MiB over TCP: {} bytes",
        big.len()
    );

    // A second VM in the same namespace is refused at start and breaks nothing.
    let b2 = bundle("net-second", &net, "sleep 60");
    let bp2 = b2.path().to_string_lossy().into_owned();
    ok(
        &runvm_to_files(
            r,
            &["create", "--bundle", &bp2, "net2"],
            &r.join("net2.out"),
            T,
        ),
        "create net2",
    );
    let second = runvm(r, &["start", "net2"], QUICK);
    fails_with(&second, "runvm container net1");
    ok(
        &runvm(r, &["delete", "--force", "net2"], QUICK),
        "delete net2",
    );
    let still = http_get(&net, &web, "index.html").unwrap();
    assert_eq!(String::from_utf8_lossy(&still).trim(), "served-by-vm");

    ok(&runvm(r, &["kill", "net1", "KILL"], QUICK), "kill");
    ok(&runvm(r, &["delete", "--force", "net1"], QUICK), "delete");
    assert_namespace_clean(&net);
}

#[test]
fn a_foreground_run_takes_over_its_namespace_itself() {
    skip_unless!(unavailable());
    let net = TestNet::new("run", MTU).unwrap();
    let root = TempDir::new("root");
    let gw = net.peer_ip();
    let script = format!("ping -c 1 -W 10 {gw} && echo PING-OK; echo run-tcp | nc {gw} 9003");
    let b = bundle("net-run", &net, &script);
    let tcp = listen(&net, &["-l", "-p", "9003"]);
    let bp = b.path().to_string_lossy().into_owned();
    let f = runvm(root.path(), &["run", "--bundle", &bp, "fg1"], T);
    ok(&f, "run");
    assert!(f.stdout.contains("PING-OK"), "{}", f.stdout);
    assert_eq!(received(tcp, QUICK).trim(), "run-tcp");
    assert_namespace_clean(&net);
}

/// Runs `f` in a thread that enters the peer's namespace.
fn in_peer<T: Send + 'static>(net: &TestNet, f: impl FnOnce() -> T + Send + 'static) -> T {
    in_netns(&net.peer, f)
}

/// Runs `f` in a thread that enters the named network namespace.
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// An HTTP/1.0 GET of `path` at `addr` from the peer's namespace: the body of a 200.
fn http_get(net: &TestNet, addr: &str, path: &str) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let request = format!("GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    in_peer(net, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(QUICK)).map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).map_err(|e| e.to_string())?;
        let end = reply
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no end of headers")?;
        let head = String::from_utf8_lossy(&reply[..end]).into_owned();
        if !head.lines().next().is_some_and(|l| l.contains(" 200 ")) {
            return Err(head);
        }
        Ok(reply[end + 4..].to_vec())
    })
}

/// The peer fetches `path` at `addr` until it answers `want` (a server still starting).
fn fetch_until(net: &TestNet, addr: &str, path: &str, want: &str, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        let got = http_get(net, addr, path).map(|b| String::from_utf8_lossy(&b).trim().to_string());
        if got.as_deref() == Ok(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{addr}/{path}: {got:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn docker_bridge_networking_inside_a_test_namespace() {
    use runvm_tests::clients::{clients_unavailable, IMAGE};
    skip_unless!(unavailable().or_else(clients_unavailable));
    // dockerd lives in the test's "host" namespace: its bridge, NAT and published ports
    // stay there; the peer plays a client on the host's network.
    let net = TestNet::new("docker", 1500).unwrap();
    let engine = Engine::docker_in_netns(&net.container).unwrap();
    let d = |args: &[&str], t| engine.docker_cmd(args, t);
    let script = "mkdir -p /www && echo docker-vm > /www/index.html && httpd -f -p 80 -h /www";
    let web = [
        "run",
        "-d",
        "--name",
        "web",
        "--runtime",
        "runvm",
        "-p",
        "8080:80",
        IMAGE,
        "sh",
        "-c",
        script,
    ];
    ok(&d(&web, T), "docker run -d -p");
    let published = format!("{}:8080", net.container_ip());
    fetch_until(&net, &published, "index.html", "docker-vm", QUICK);
    let inspect = d(
        &["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "web"],
        QUICK,
    );
    let ip = ok(&inspect, "inspect").stdout.trim().to_string();
    let exec = d(
        &["exec", "web", "ip", "-o", "-4", "addr", "show", "eth0"],
        QUICK,
    );
    assert!(
        ok(&exec, "exec").stdout.contains(&format!("inet {ip}/")),
        "{}",
        exec.stdout
    );

    // Out through docker0's NAT to the peer.
    let ping = [
        "run",
        "--rm",
        "--runtime",
        "runvm",
        IMAGE,
        "ping",
        "-c",
        "1",
        "-W",
        "10",
    ];
    let mut args = ping.to_vec();
    let peer_ip = net.peer_ip();
    args.push(&peer_ip);
    ok(&d(&args, T), "a container pings the peer");

    // --network none: loopback only.
    let none = [
        "run",
        "--rm",
        "--runtime",
        "runvm",
        "--network",
        "none",
        IMAGE,
        "ip",
        "-o",
        "-4",
        "addr",
    ];
    let f = d(&none, T);
    let lines: Vec<&str> = ok(&f, "--network none").stdout.lines().collect();
    assert!(lines.iter().all(|l| l.contains(" lo ")), "{lines:?}");
    ok(&d(&["rm", "-f", "web"], QUICK), "rm -f");
}

/// A `ctr run` in the foreground, killed (by its pid) if the test ends before it does.
struct Foreground(std::process::Child);

impl Drop for Foreground {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Connects from namespace `ns` to `addr` until something listens there; the first line
/// it sends.
fn first_line(ns: &str, addr: std::net::SocketAddr, bound: Duration) -> Result<String, String> {
    in_netns(ns, move || {
        let deadline = Instant::now() + bound;
        let mut s = loop {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(format!("{addr}: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        s.set_read_timeout(Some(QUICK)).map_err(|e| e.to_string())?;
        let mut line = Vec::new();
        let mut byte = [0u8];
        while !line.ends_with(b"\n") && s.read(&mut byte).map_err(|e| e.to_string())? == 1 {
            line.push(byte[0]);
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    })
}

/// The processes in mount namespace `mnt` (`mnt:[INODE]`).
fn in_mount_namespace(mnt: &str) -> Vec<i32> {
    let pids = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    pids.filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .is_ok_and(|l| l.to_string_lossy() == mnt)
        })
        .collect()
}

/// `ctr run --rm --cni` of `script` on runvm, from a busybox root file system, in the
/// foreground; its output goes to the returned file.
fn ctr_run_cni(engine: &Engine, id: &str, script: &str) -> (Foreground, PathBuf) {
    let d = engine.dir.path();
    let rootfs = d.join("rootfs");
    runvm_tests::busybox_rootfs(&rootfs).unwrap();
    let p = |s: &str| d.join(s).to_string_lossy().into_owned();
    let runvm = runvm_tests::runvm_bin().unwrap();
    let (runc_root, fifo_dir) = (p("runvm-root"), p("fifo"));
    let mut args = vec!["run", "--rm", "--cni", "--runtime", "io.containerd.runc.v2"];
    args.extend(["--runc-binary", runvm.to_str().unwrap()]);
    args.extend(["--runc-root", &runc_root, "--fifo-dir", &fifo_dir]);
    args.extend(["--env", "PATH=/bin:/sbin:/usr/bin:/usr/sbin"]);
    args.extend([
        "--rootfs",
        rootfs.to_str().unwrap(),
        id,
        "/bin/sh",
        "-c",
        script,
    ]);
    let out = d.join(format!("{id}.out"));
    let file = std::fs::File::create(&out).unwrap();
    let mut cmd = engine.ctr_command(&args);
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    (Foreground(cmd.spawn().unwrap()), out)
}

/// The address `ip -o -4 addr show eth0` printed in `text`, if it starts with `prefix`.
fn eth0_address(text: &str, prefix: &str) -> Option<String> {
    text.lines()
        .filter(|l| l.contains(" eth0 "))
        .flat_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .find_map(|a| a.strip_suffix("/24").filter(|a| a.starts_with(prefix)))
        .map(String::from)
}

/// Polls `done` until it holds or `bound` passes; whether it held.
fn eventually(bound: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    true
}

#[test]
fn containerd_cni_bridge_networking_inside_a_test_namespace() {
    use runvm_tests::clients::clients_unavailable;
    use runvm_tests::cni::{cni_unavailable, BridgeNet};
    skip_unless!(unavailable()
        .or_else(clients_unavailable)
        .or_else(cni_unavailable));
    // containerd and ctr live in the test's "host" namespace, where the CNI bridge goes;
    // the CNI configuration is mounted only in their private mount namespace.
    let net = TestNet::new("cni", 1500).unwrap();
    let cni = BridgeNet::new("runvm-test", "rvt-cni0", 77);
    let engine = Engine::containerd_in_netns(&net.container, |d| cni.mount_setup(d)).unwrap();
    let mnt = engine.mount_namespace().unwrap();
    let gw = cni.gateway();
    let script = format!(
        "ip -o -4 addr show eth0; ip route; ping -c 1 -W 10 {gw} && echo PING-OK; \
         echo SERVING; echo cni-reply | nc -l -p 9000"
    );
    let (mut ctr, out) = ctr_run_cni(&engine, "cni1", &script);
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    eventually(T, || {
        read().contains("SERVING") || ctr.0.try_wait().is_ok_and(|s| s.is_some())
    });
    let text = read();
    assert!(text.contains("SERVING"), "ctr run --cni:\n{text}");
    let addr = eth0_address(&text, &cni.prefix())
        .unwrap_or_else(|| panic!("no CNI address on eth0:\n{text}"));
    assert!(text.contains(&format!("default via {gw}")), "{text}");
    assert!(text.contains("PING-OK"), "no reply from {gw}:\n{text}");
    // The namespace reaches the container at its CNI address.
    let to = format!("{addr}:9000").parse().unwrap();
    let reply = first_line(&net.container, to, QUICK);
    assert_eq!(reply.as_deref().map(str::trim), Ok("cni-reply"));
    eventually(QUICK, || ctr.0.try_wait().unwrap().is_some());
    let status = ctr.0.try_wait().unwrap();
    let text = read();
    let exited = status.is_some_and(|s| s.success());
    assert!(exited, "ctr run: {status:?}\n{text}");

    // host-local kept its state in the test's directory, and ctr's CNI DEL gave the
    // address back; the VM, its shim and its veth are gone.
    let ipam = engine.dir.path().join("cni/ipam").join(&cni.name);
    assert!(
        ipam.join("last_reserved_ip.0").exists(),
        "no IPAM state in {ipam:?}"
    );
    assert!(!ipam.join(&addr).exists(), "{addr} is still allocated");
    let vms = || {
        let left = engine.leftover_processes().into_iter();
        left.filter(|(_, c)| c.contains("vmm-serve") || c.contains("containerd-shim"))
            .count()
    };
    assert!(
        eventually(QUICK, || vms() == 0),
        "{:?}",
        engine.leftover_processes()
    );
    let links = || runvm_tests::netns::ip(&["-n", &net.container, "-o", "link"]).unwrap();
    assert!(
        eventually(QUICK, || !links().contains("veth")),
        "{}",
        links()
    );
    drop(engine);
    let held = in_mount_namespace(&mnt);
    assert!(held.is_empty(), "pids {held:?} keep the private mounts");
}
