//! Docker benchmark: wall time of `docker run --rm IMAGE true` with runvm and with runc as
//! the runtime, on the same private dockerd, in one run. Prints medians and the ratio.
//!
//! `make bench BENCHES=docker`. Env: as for the tests (RUNVM_BIN, RUNVM_KERNEL,
//! RUNVM_INITRD); BENCH_RUNS (default 3). Needs docker.io, containerd and runc (`make deps`).

use runvm_tests::clients::{clients_unavailable, Engine, IMAGE};
use runvm_tests::{bench_runs, median};

fn main() {
    if let Some(why) = clients_unavailable() {
        eprintln!("docker benchmark cannot run: {why}");
        std::process::exit(1);
    }
    let runs = bench_runs(3);
    let d = Engine::docker().unwrap_or_else(|e| panic!("{e}"));
    // One unmeasured run each: the first container of a fresh daemon pays for its setup.
    d.docker_run_true_ms("runc");
    d.docker_run_true_ms("runvm");
    let (mut v, mut c) = (vec![], vec![]);
    for i in 0..runs {
        eprintln!("run {}/{runs}", i + 1);
        v.push(d.docker_run_true_ms("runvm"));
        c.push(d.docker_run_true_ms("runc"));
    }
    let (v, c) = (median(v), median(c));
    println!(
        "docker benchmark: `docker run --rm {IMAGE} true`, {runs} runs each, medians; host: {}",
        vmm::host_profile::HostProfile::detect().describe()
    );
    println!("{:<18} {:>14}", "runtime", "wall (ms)");
    println!("{:<18} {:>14.0}", "runvm", v);
    println!("{:<18} {:>14.0}", "runc", c);
    println!("{:<18} {:>14.1}", "ratio runvm/runc", v / c);
}
