//! Network benchmark: TCP throughput (peer -> container) and one-byte round-trip latency
//! between a peer network namespace and a container, for runvm and for runc on the same
//! namespace setup (`runvm_tests::netns`: a veth pair, MTU 1500), in one run. The
//! container runs `net-bench serve` (a static test program); the peer runs its client.
//! Prints medians and ratios.
//!
//! `make bench BENCHES=network`. Env: RUNVM_BIN, RUNVM_KERNEL, RUNVM_INITRD,
//! RUNVM_TEST_BINS; BENCH_RUNS (default 3), BENCH_NET_MIB (default 32).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runvm_tests::netns::{netns_test_unavailable, TestNet};
use runvm_tests::{
    bench_runs, container_test_unavailable, median, runvm_bin, static_test_bin, TempDir, TestBundle,
};

const PORT: &str = "5201";

/// Runs `net-bench ARGS` in the peer's namespace; its one line of output as a number.
fn client(net: &TestNet, tool: &str, args: &[&str]) -> Result<f64, String> {
    let out = net
        .in_peer(tool)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .map_err(|_| format!("net-bench printed {text:?}"))
}

struct Figures {
    mib_s: f64,
    rtt_us: f64,
}

/// Starts a `net-bench serve` container with `runtime`, measures, removes it.
fn measure(runtime: &str, tool: &str, runs: usize, mib: &str) -> Result<Figures, String> {
    let net = TestNet::new(&format!("bench-{runtime}"), 1500)?;
    let mut b = TestBundle::new("bench-net", &["/net-bench", "serve", PORT]);
    std::fs::copy(tool, b.rootfs().join("net-bench")).map_err(|e| e.to_string())?;
    let path = net.container_path().to_string_lossy().into_owned();
    b.edit(|c| {
        let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "network");
        ns.push(serde_json::json!({"type": "network", "path": path}));
    });
    let root = TempDir::new("bench-net-root");
    let bin = match runtime {
        "runvm" => runvm_bin()?.to_string_lossy().into_owned(),
        other => other.to_string(),
    };
    let log = std::fs::File::create(root.path().join("out")).map_err(|e| e.to_string())?;
    let status = Command::new(&bin)
        .arg("--root")
        .arg(root.path())
        .args(["run", "--detach", "--bundle"])
        .arg(b.path())
        .arg("bench")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .status()
        .map_err(|e| e.to_string())?;
    let result = if status.success() {
        serve_and_measure(&net, tool, runs, mib)
    } else {
        Err(format!("{runtime} run: {status}"))
    };
    let _ = Command::new(&bin)
        .arg("--root")
        .arg(root.path())
        .args(["delete", "--force", "bench"])
        .status();
    result
}

fn serve_and_measure(net: &TestNet, tool: &str, runs: usize, mib: &str) -> Result<Figures, String> {
    let addr = format!("{}:{PORT}", net.container_ip());
    let deadline = Instant::now() + Duration::from_secs(300);
    while client(net, tool, &["rtt", &addr, "1"]).is_err() {
        if Instant::now() > deadline {
            return Err("the server never answered".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut tput, mut rtt) = (vec![], vec![]);
    for _ in 0..runs {
        tput.push(client(net, tool, &["stream", &addr, mib])?);
        rtt.push(client(net, tool, &["rtt", &addr, "200"])?);
    }
    Ok(Figures {
        mib_s: median(tput),
        rtt_us: median(rtt),
    })
}

fn main() {
    if let Some(why) = container_test_unavailable().or_else(netns_test_unavailable) {
        eprintln!("network benchmark cannot run: {why}");
        std::process::exit(1);
    }
    let tool = match static_test_bin("net-bench") {
        Ok(p) => p.to_string_lossy().into_owned(),
        Err(why) => {
            eprintln!("network benchmark cannot run: {why}");
            std::process::exit(1);
        }
    };
    let runs = bench_runs(3);
    let mib = std::env::var("BENCH_NET_MIB").unwrap_or_else(|_| "32".into());
    let has_runc = Command::new("runc").arg("--version").output().is_ok();
    let runvm = measure("runvm", &tool, runs, &mib).unwrap_or_else(|e| panic!("runvm: {e}"));
    println!(
        "network benchmark, peer namespace <-> container over a veth pair, {runs} runs, medians; host: {}",
        vmm::host_profile::HostProfile::detect().describe()
    );
    println!(
        "{:<18} {:>22} {:>22}",
        "runtime", "TCP to container MiB/s", "TCP round trip (us)"
    );
    println!(
        "{:<18} {:>22.1} {:>22.0}",
        "runvm", runvm.mib_s, runvm.rtt_us
    );
    if !has_runc {
        println!("runc not found: no reference run (make deps installs it)");
        return;
    }
    let runc = measure("runc", &tool, runs, &mib).unwrap_or_else(|e| panic!("runc: {e}"));
    println!("{:<18} {:>22.1} {:>22.0}", "runc", runc.mib_s, runc.rtt_us);
    println!(
        "{:<18} {:>22.2} {:>22.1}",
        "ratio runvm/runc",
        runvm.mib_s / runc.mib_s,
        runvm.rtt_us / runc.rtt_us
    );
}
