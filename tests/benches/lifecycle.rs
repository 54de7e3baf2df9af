//! Lifecycle benchmark: `create` -> `start` -> (process exits) -> `delete`, and `run true`,
//! for runvm and for runc on the same busybox bundle, in one run. Prints medians and ratios.
//!
//! `make bench BENCHES=lifecycle`. Env: RUNVM_BIN, RUNVM_KERNEL, RUNVM_INITRD; BENCH_RUNS
//! (default 3). runc comes from Debian's package (`make deps`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runvm_tests::{bench_runs, container_test_unavailable, median, runvm_bin, TempDir, TestBundle};

/// Runs a runtime command with no stdio of ours: a detached container keeps the stdio
/// `create` had, so a pipe here would not reach end of file while it lives. Errors go to
/// a file that is shown when the command fails.
fn quiet(mut c: Command) {
    let err_path = std::env::temp_dir().join(format!("runvm-bench-lc-{}.err", std::process::id()));
    let err = std::fs::File::create(&err_path).expect("error file");
    let status = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .status()
        .expect("spawning the runtime");
    let text = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&err_path);
    assert!(status.success(), "{c:?}: {text}");
}

fn state_status(runtime: &Command, id: &str) -> String {
    let mut c = Command::new(runtime.get_program());
    c.args(runtime.get_args()).args(["state", id]);
    let out = c.output().expect("state");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["status"].as_str().unwrap_or("").to_string()
}

/// A runtime invocation prefix (binary and global flags).
fn runtime(bin: &str, root: &std::path::Path) -> Command {
    let mut c = Command::new(bin);
    c.arg("--root").arg(root);
    c
}

fn with(base: &Command, args: &[&str]) -> Command {
    let mut c = Command::new(base.get_program());
    c.args(base.get_args()).args(args);
    c
}

/// create, start, wait for the process to end, delete.
fn lifecycle(base: &Command, bundle: &str, id: &str) -> Duration {
    let t = Instant::now();
    quiet(with(base, &["create", "--bundle", bundle, id]));
    quiet(with(base, &["start", id]));
    while state_status(base, id) != "stopped" {
        std::thread::sleep(Duration::from_millis(5));
    }
    quiet(with(base, &["delete", id]));
    t.elapsed()
}

fn run_true(base: &Command, bundle: &str, id: &str) -> Duration {
    let t = Instant::now();
    quiet(with(base, &["run", "--bundle", bundle, id]));
    t.elapsed()
}

fn main() {
    if let Some(why) = container_test_unavailable() {
        eprintln!("lifecycle benchmark cannot run: {why}");
        std::process::exit(1);
    }
    let runs = bench_runs(3);
    let bundle = TestBundle::new("bench-lc", &["true"]);
    let b = bundle.path().to_string_lossy().into_owned();
    let roots = TempDir::new("bench-lc-roots");
    let runvm_bin = runvm_bin().unwrap().to_string_lossy().into_owned();
    let runvm = runtime(&runvm_bin, &roots.path().join("runvm"));
    let has_runc = Command::new("runc").arg("--version").output().is_ok();
    let runc = runtime("runc", &roots.path().join("runc"));

    let (mut vl, mut vr, mut cl, mut cr) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        eprintln!("run {}/{runs}", i + 1);
        vl.push(lifecycle(&runvm, &b, &format!("lc{i}")).as_secs_f64() * 1e3);
        vr.push(run_true(&runvm, &b, &format!("rt{i}")).as_secs_f64() * 1e3);
        if has_runc {
            cl.push(lifecycle(&runc, &b, &format!("lc{i}")).as_secs_f64() * 1e3);
            cr.push(run_true(&runc, &b, &format!("rt{i}")).as_secs_f64() * 1e3);
        }
    }
    println!(
        "lifecycle benchmark, {runs} runs each, medians; host: {}",
        vmm::host_profile::HostProfile::detect().describe()
    );
    println!(
        "{:<18} {:>28} {:>16}",
        "runtime", "create+start+delete (ms)", "run true (ms)"
    );
    let (lv, rv) = (median(vl), median(vr));
    println!("{:<18} {:>28.0} {:>16.0}", "runvm", lv, rv);
    if !has_runc {
        println!("runc not found: no reference run (make deps installs it)");
        return;
    }
    let (lc, rc) = (median(cl), median(cr));
    println!("{:<18} {:>28.0} {:>16.0}", "runc", lc, rc);
    println!(
        "{:<18} {:>28.1} {:>16.1}",
        "ratio runvm/runc",
        lv / lc,
        rv / rc
    );
}
