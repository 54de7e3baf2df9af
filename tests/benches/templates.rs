//! Template benchmark, in one run: `runvm run true` booting cold (`--templates off`) and
//! restoring a template, against runc on the same bundle (latency and the peak RSS of the
//! runtime process, which is the VMM for a foreground `runvm run`); `docker run --rm IMAGE
//! true` the same three ways on one private dockerd; and 20 containers created and started
//! back to back from one template, against 20 runc containers: wall time and the memory
//! all of them hold (PSS, which splits the template's shared page cache among the VMs).
//!
//! `make bench BENCHES=templates`. Env: as for the tests; BENCH_RUNS (default 3),
//! BENCH_CONTAINERS (default 20). Needs docker.io, containerd and runc (`make deps`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use runvm_tests::clients::{clients_unavailable, Engine};
use runvm_tests::{
    bench_runs, container_test_unavailable, median, runvm_bin, shared_templates, TempDir,
    TestBundle,
};

/// Runs `cmd` with no stdio of ours; returns its wall time (ms) and peak RSS (MiB).
// The child is reaped by wait4, which std does not offer and which also reports its usage.
#[allow(clippy::zombie_processes)]
fn measure(mut cmd: Command) -> (f64, f64) {
    let t = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning the runtime");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own unreaped child with valid out pointers.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert!(
        r > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed"
    );
    (
        t.elapsed().as_secs_f64() * 1e3,
        usage.ru_maxrss as f64 / 1024.0,
    )
}

fn runtime(bin: &Path, root: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.arg("--root").arg(root).args(extra);
    c
}

fn with(base: &Command, args: &[&str]) -> Command {
    let mut c = Command::new(base.get_program());
    c.args(base.get_args()).args(args);
    c
}

/// Sum of the PSS (KiB) of `pids`.
fn pss_kib(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// Creates and starts `n` containers of `bundle` back to back; returns the wall time (s)
/// and the PSS (MiB) of the processes their states name (VMMs, or runc's container
/// processes), measured once all run; deletes them.
fn back_to_back(base: &Command, bundle: &str, n: usize, tag: &str) -> (f64, f64) {
    let t = Instant::now();
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}{i}")).collect();
    for id in &ids {
        measure(with(base, &["create", "--bundle", bundle, id]));
        measure(with(base, &["start", id]));
    }
    let wall = t.elapsed().as_secs_f64();
    let pids: Vec<i32> = ids
        .iter()
        .filter_map(|id| {
            let out = with(base, &["state", id]).output().ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v["pid"].as_i64().map(|p| p as i32)
        })
        .collect();
    let pss = pss_kib(&pids) as f64 / 1024.0;
    for id in &ids {
        let _ = with(base, &["delete", "--force", id]).output();
    }
    (wall, pss)
}

fn main() {
    if let Some(why) = container_test_unavailable().or_else(clients_unavailable) {
        eprintln!("templates benchmark cannot run: {why}");
        std::process::exit(1);
    }
    let runs = bench_runs(3);
    let n: usize = std::env::var("BENCH_CONTAINERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let runvm = runvm_bin().unwrap();
    let store = shared_templates();
    let made = measure({
        let mut c = Command::new(&runvm);
        c.arg("--template-dir")
            .arg(&store)
            .args(["template", "create"]);
        c
    });
    let roots = TempDir::new("bench-tpl-roots");
    let r = |name: &str| roots.path().join(name);
    let cold = runtime(&runvm, &r("cold"), &["--templates", "off"]);
    let warm = runtime(
        &runvm,
        &r("warm"),
        &["--template-dir", store.to_str().unwrap()],
    );
    let runc = runtime(Path::new("runc"), &r("runc"), &[]);
    let host = vmm::host_profile::HostProfile::detect().describe();
    println!("templates benchmark, {runs} runs each, medians; host: {host}");
    println!("template made in {:.1} s", made.0 / 1e3);
    run_true(runs, [&cold, &warm, &runc]);
    docker(runs);
    let sleeper = TestBundle::new("bench-tpl-sleep", &["sleep", "600"]);
    let s = sleeper.path().to_string_lossy().into_owned();
    println!("{n} containers back to back");
    println!(
        "{:<16} {:>16} {:>20}",
        "runtime", "wall (s)", "total PSS (MiB)"
    );
    for (name, base) in [("runvm template", &warm), ("runc", &runc)] {
        let (wall, pss) = back_to_back(base, &s, n, "b2b");
        println!("{name:<16} {wall:>16.1} {pss:>20.1}");
    }
}

/// `run true` booting cold, from a template, and with runc: wall time and peak RSS.
fn run_true(runs: usize, [cold, warm, runc]: [&Command; 3]) {
    let bundle = TestBundle::new("bench-tpl", &["true"]);
    let b = bundle.path().to_string_lossy().into_owned();
    let mut rows: Vec<(&str, Vec<(f64, f64)>)> = vec![
        ("runvm cold", vec![]),
        ("runvm template", vec![]),
        ("runc", vec![]),
    ];
    for i in 0..runs {
        eprintln!("run true {}/{runs}", i + 1);
        for (row, base) in rows.iter_mut().zip([cold, warm, runc]) {
            row.1.push(measure(with(
                base,
                &["run", "--bundle", &b, &format!("rt{i}")],
            )));
        }
    }
    println!(
        "{:<16} {:>16} {:>20}",
        "run true", "wall (ms)", "peak RSS (MiB)"
    );
    let mut med = Vec::new();
    for (name, v) in &rows {
        let (w, m) = (
            median(v.iter().map(|x| x.0).collect()),
            median(v.iter().map(|x| x.1).collect()),
        );
        println!("{name:<16} {w:>16.0} {m:>20.1}");
        med.push(w);
    }
    println!(
        "ratios: template/cold {:.3}, template/runc {:.1}",
        med[1] / med[0],
        med[1] / med[2]
    );
}

/// `docker run --rm IMAGE true` the three ways, on one private dockerd.
fn docker(runs: usize) {
    let d = Engine::docker().unwrap_or_else(|e| panic!("{e}"));
    // One unmeasured run each: the first container of a fresh daemon pays for its setup.
    for rt in ["runc", "runvm", "runvm-cold"] {
        d.docker_run_true_ms(rt);
    }
    println!("{:<16} {:>16}", "docker run", "wall (ms)");
    let mut dm = Vec::new();
    for rt in ["runvm-cold", "runvm", "runc"] {
        let m = median((0..runs).map(|_| d.docker_run_true_ms(rt)).collect());
        println!("{rt:<16} {m:>16.0}");
        dm.push(m);
    }
    println!(
        "ratios: template/cold {:.3}, template/runc {:.1}",
        dm[1] / dm[0],
        dm[1] / dm[2]
    );
}
