//! Share benchmark: sequential write/read MiB/s and small-file create+stat per second inside
//! a runvm container on a bind-mounted host directory (virtio-fs), next to the same
//! workload (`fs-bench`) run on the host on that directory, in one run.
//!
//! `make bench BENCHES=share`. Env: as for the tests; BENCH_RUNS (default 3), BENCH_MIB
//! (32), BENCH_FILES (500).

use std::process::Command;
use std::time::Duration;

use runvm_tests::{
    bench_runs, container_test_unavailable, median, runvm, static_test_bin, TempDir, TestBundle,
};

fn parse(out: &str) -> [f64; 3] {
    let get = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {k} in fs-bench output:\n{out}"))
    };
    [
        get("seq_write_mib_s="),
        get("seq_read_mib_s="),
        get("create_stat_per_s="),
    ]
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn main() {
    if let Some(why) = container_test_unavailable().or_else(|| static_test_bin("fs-bench").err()) {
        eprintln!("share benchmark cannot run: {why}");
        std::process::exit(1);
    }
    let runs = bench_runs(3);
    let (mib, files) = (env("BENCH_MIB", "32"), env("BENCH_FILES", "500"));
    let bin = static_test_bin("fs-bench").unwrap();
    let host_dir = TempDir::new("bench-share");
    let host_s = host_dir.path().to_string_lossy().into_owned();
    let root = TempDir::new("bench-share-root");
    let mut b = TestBundle::new("bench-share", &["fs-bench", "/work", &mib, &files]);
    std::fs::copy(&bin, b.rootfs().join("bin/fs-bench")).unwrap();
    b.edit(|c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!(
            {"destination": "/work", "type": "bind", "source": host_s.clone(), "options": ["rbind", "rw"]}
        ));
    });
    let bundle = b.path().to_string_lossy().into_owned();

    let (mut vm, mut host) = (vec![], vec![]);
    for i in 0..runs {
        eprintln!("run {}/{runs}", i + 1);
        let f = runvm(
            root.path(),
            &["run", "--bundle", &bundle, &format!("fsb{i}")],
            Duration::from_secs(1800),
        );
        assert_eq!(f.code, Some(0), "fs-bench in the VM: {f:?}");
        vm.push(parse(&f.stdout));
        let out = Command::new(&bin)
            .args([&host_s, &mib, &files])
            .output()
            .expect("fs-bench on the host");
        assert!(out.status.success());
        host.push(parse(&String::from_utf8_lossy(&out.stdout)));
    }
    let col = |s: &[[f64; 3]], k: usize| median(s.iter().map(|r| r[k]).collect());
    println!(
        "share benchmark: {mib} MiB sequential, {files} small files, {runs} runs each, medians; host: {}",
        vmm::host_profile::HostProfile::detect().describe()
    );
    println!(
        "{:<26} {:>16} {:>16} {:>20}",
        "where", "write (MiB/s)", "read (MiB/s)", "create+stat (/s)"
    );
    for (name, s) in [("VM over virtio-fs", &vm), ("host, same directory", &host)] {
        println!(
            "{:<26} {:>16.2} {:>16.2} {:>20.1}",
            name,
            col(s, 0),
            col(s, 1),
            col(s, 2)
        );
    }
    println!(
        "{:<26} {:>16.4} {:>16.4} {:>20.4}",
        "ratio VM/host",
        col(&vm, 0) / col(&host, 0),
        col(&vm, 1) / col(&host, 1),
        col(&vm, 2) / col(&host, 2)
    );
}
