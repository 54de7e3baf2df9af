//! Boot benchmark: time from VMM process start to the first line of `/init` on the console,
//! and the VMM's peak RSS, for runvm and for QEMU's `microvm` machine booting the same
//! kernel and initramfs with the same command line, in one run. Prints a table with the
//! medians and the runvm/QEMU ratios.
//!
//! `cargo bench -p runvm-tests --bench boot` (or `make bench`, which builds what it needs).
//! Env: RUNVM_BIN, RUNVM_KERNEL, RUNVM_TEST_BINS; BENCH_RUNS (default 3).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runtime_cli::initramfs::Initramfs;
use runvm_tests::{
    bench_runs, boot_check_init, kernel, median, runvm_bin, vm_test_unavailable, TempDir,
};
use vmm::{HostKind, HostProfile};

struct Sample {
    to_init: Duration,
    total: Duration,
    max_rss_kib: i64,
}

/// Spawns `cmd`, times the first "boot-check: init started" line, waits, and reads the
/// child's peak RSS from wait4.
fn measure(mut cmd: Command) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let stdout = child.stdout.take().unwrap();
    let mut to_init = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if to_init.is_none() && line.contains("boot-check: init started") {
            to_init = Some(start.elapsed());
        }
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid out-pointers.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let total = start.elapsed();
    if r < 0 {
        return Err("wait4 failed".into());
    }
    Ok(Sample {
        to_init: to_init.ok_or("the guest never printed its first line")?,
        total,
        max_rss_kib: usage.ru_maxrss,
    })
}

fn main() {
    if let Some(why) = vm_test_unavailable().or_else(|| boot_check_init().err()) {
        eprintln!("boot benchmark cannot run: {why}");
        std::process::exit(1);
    }
    let runs = bench_runs(3);
    let dir = TempDir::new("bench-boot");
    let initrd = dir.path().join("initrd.cpio");
    let mut image = Initramfs::new();
    image
        .base_layout()
        .file_from("init", 0o755, &boot_check_init().unwrap())
        .unwrap()
        .file("etc/boot-check", 0o644, "bench\n");
    std::fs::write(&initrd, image.to_bytes()).unwrap();
    let kernel = kernel().unwrap();
    let profile = HostProfile::detect();
    let cmdline = vmm::cmdline::build(&profile, &[], "")
        .unwrap()
        .as_cstring()
        .unwrap()
        .into_string()
        .unwrap();
    let qemu = which("qemu-system-x86_64");

    let runvm_cmd = || {
        let mut c = Command::new(runvm_bin().unwrap());
        c.args(["boot", "--mem", "128", "--cpus", "1", "--kernel"])
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd);
        c
    };
    let qemu_cmd = |q: &str| {
        let mut c = Command::new(q);
        // QEMU's CPU model "host" sets MSRs a software KVM refuses.
        let cpu = if profile.kind() == HostKind::SoftwareKvm {
            "host,-arch-capabilities"
        } else {
            "host"
        };
        c.args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,acpi=off",
            "-enable-kvm",
            "-cpu",
            cpu,
            "-m",
            "128",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        // QEMU has no i8042 on microvm: the guest resets by triple fault (reboot=t).
        .arg("-append")
        .arg(cmdline.replace("reboot=k", "reboot=t"));
        c
    };

    let mut rv = Vec::new();
    let mut qm = Vec::new();
    for i in 0..runs {
        eprintln!("run {}/{runs}", i + 1);
        rv.push(measure(runvm_cmd()).expect("runvm boot"));
        if let Some(q) = &qemu {
            qm.push(measure(qemu_cmd(q)).expect("qemu boot"));
        }
    }
    let stat = |s: &[Sample], f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
    let to_init = |s: &Sample| s.to_init.as_secs_f64() * 1000.0;
    let total = |s: &Sample| s.total.as_secs_f64() * 1000.0;
    let rss = |s: &Sample| s.max_rss_kib as f64 / 1024.0;

    println!(
        "boot benchmark, {runs} runs each, medians; host: {}",
        profile.describe()
    );
    println!(
        "{:<22} {:>16} {:>16} {:>14}",
        "VMM", "to /init (ms)", "to exit (ms)", "peak RSS (MiB)"
    );
    println!(
        "{:<22} {:>16.0} {:>16.0} {:>14.1}",
        "runvm",
        stat(&rv, to_init),
        stat(&rv, total),
        stat(&rv, rss)
    );
    if qm.is_empty() {
        println!(
            "qemu-system-x86_64 not found: no reference run (apt-get install qemu-system-x86)"
        );
        return;
    }
    println!(
        "{:<22} {:>16.0} {:>16.0} {:>14.1}",
        "qemu microvm",
        stat(&qm, to_init),
        stat(&qm, total),
        stat(&qm, rss)
    );
    println!(
        "{:<22} {:>16.2} {:>16.2} {:>14.2}",
        "ratio runvm/qemu",
        stat(&rv, to_init) / stat(&qm, to_init),
        stat(&rv, total) / stat(&qm, total),
        stat(&rv, rss) / stat(&qm, rss)
    );
}

fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| format!("{d}/{name}"))
        .find(|p| std::path::Path::new(p).exists())
}
