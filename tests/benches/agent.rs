//! Agent benchmark: time from "agent ready" to a process's first stdout byte, and stdout
//! throughput, for the agent in a VM (over virtio-vsock), the same agent on the host (over
//! a Unix socket), and a plain host pipe, in one run. Prints medians and ratios.
//!
//! `cargo bench -p runvm-tests --bench agent` (or `make bench`).
//! Env: RUNVM_KERNEL, RUNVM_AGENT, RUNVM_TEST_BINS; BENCH_RUNS (default 5), BENCH_MIB (16).
//! The byte stream comes from the static `pattern` program (64 KiB writes).

use std::io::Read;
use std::process::{Command, Stdio as StdStdio};
use std::time::{Duration, Instant};

use agent_protocol::{ProcessSpec, Stdio, StreamKind};
use runtime_cli::agent_client::AgentClient;
use runtime_cli::sandbox::Sandbox;
use runvm_tests::{
    agent_bin, agent_initramfs, busybox, kernel, median, static_test_bin, vm_test_unavailable,
    HostAgent, TempDir,
};
use vmm::VmConfig;

fn spec(args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}

/// Runs `args` through the agent; returns (time to first stdout byte, bytes, total time).
fn through_agent(client: &AgentClient, id: &str, args: &[&str]) -> (Duration, usize, Duration) {
    let mut control = client.control().unwrap();
    let start = Instant::now();
    control
        .create(
            id,
            spec(args),
            Stdio {
                stdin: false,
                stdout: true,
                stderr: false,
            },
            false,
            None,
        )
        .unwrap();
    let mut out = client.attach(id, StreamKind::Stdout).unwrap();
    control.start(id).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut first = None;
    let mut total = 0;
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| start.elapsed());
        total += n;
    }
    let status = control.wait(id).unwrap();
    assert_eq!(status, 0);
    (first.unwrap_or_default(), total, start.elapsed())
}

/// The same through a plain host pipe.
fn through_pipe(args: &[&str]) -> (Duration, usize, Duration) {
    let start = Instant::now();
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdout(StdStdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut first = None;
    let mut total = 0;
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| start.elapsed());
        total += n;
    }
    assert!(child.wait().unwrap().success());
    (first.unwrap_or_default(), total, start.elapsed())
}

fn main() {
    if let Some(why) = vm_test_unavailable()
        .or_else(|| agent_bin().err())
        .or_else(|| busybox().err())
        .or_else(|| static_test_bin("pattern").err())
    {
        eprintln!("agent benchmark cannot run: {why}");
        std::process::exit(1);
    }
    let env_num = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let runs = env_num("BENCH_RUNS", 5);
    let mib = env_num("BENCH_MIB", 16);
    let count = format!("{}", mib << 20);
    let echo = ["echo", "x"];
    // The stream source writes 64 KiB at a time and costs next to nothing itself.
    let pattern = static_test_bin("pattern").unwrap();
    let host_pattern = pattern.to_string_lossy().into_owned();
    let bulk_vm = ["pattern", count.as_str()];
    let bulk_host = [host_pattern.as_str(), count.as_str()];

    let dir = TempDir::new("bench-agent");
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(
        &initrd,
        agent_initramfs(&[("bin/pattern", &pattern)]).unwrap(),
    )
    .unwrap();
    let mut config = VmConfig::new(kernel().unwrap());
    config.initrd = Some(initrd);
    eprintln!("booting the VM");
    let sandbox = Sandbox::boot(config, dir.path(), Duration::from_secs(300)).unwrap();
    let host = HostAgent::start();

    let paths = [
        (
            "agent in VM (vsock)",
            Some(sandbox.client().clone()),
            &bulk_vm,
        ),
        ("agent on host (unix)", Some(host.client()), &bulk_host),
        ("host pipe", None, &bulk_host),
    ];
    let mut rows = Vec::new();
    for (name, client, bulk) in paths {
        let mut first = Vec::new();
        let mut rate = Vec::new();
        for i in 0..runs {
            let (f, _, _) = match &client {
                Some(c) => through_agent(c, &format!("echo{i}"), &echo),
                None => through_pipe(&echo),
            };
            first.push(f.as_secs_f64() * 1000.0);
        }
        for i in 0..runs.min(3) {
            let (_, bytes, total) = match &client {
                Some(c) => through_agent(c, &format!("bulk{i}"), &bulk[..]),
                None => through_pipe(&bulk[..]),
            };
            assert_eq!(bytes, mib << 20);
            rate.push(bytes as f64 / (1 << 20) as f64 / total.as_secs_f64());
        }
        eprintln!("{name}: done");
        rows.push((name, median(first), median(rate)));
    }
    let mut c = sandbox.client().control().unwrap();
    let _ = c.shutdown();
    drop(c);
    let exit = sandbox.finish(Duration::from_secs(30));

    println!(
        "agent benchmark: {runs} runs (latency), {} runs of {mib} MiB (throughput), medians",
        runs.min(3)
    );
    println!(
        "{:<26} {:>20} {:>16}",
        "path", "to first byte (ms)", "stdout (MiB/s)"
    );
    for (name, f, r) in &rows {
        println!("{name:<26} {f:>20.2} {r:>16.1}");
    }
    let (_, pipe_first, pipe_rate) = rows[2];
    for (name, f, r) in &rows[..2] {
        let label = format!(
            "ratio {}/pipe",
            name.split(' ').take(3).collect::<Vec<_>>().join(" ")
        );
        println!(
            "{label:<26} {:>20.1} {:>16.4}",
            f / pipe_first,
            r / pipe_rate
        );
    }
    println!("VM ended: {exit}");
}
