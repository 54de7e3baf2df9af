//! Bad input to `runvm boot`: each case must fail with one clear line on stderr, a non-zero
//! exit, and nothing left behind (here: no console log created).

use std::process::Command;
use std::time::Duration;

use runvm_tests::{
    kernel, kvm_unavailable, run_with_timeout, runvm_bin, skip_unless, Finished, TempDir,
};

fn runvm(args: &[&str]) -> Finished {
    let mut c = Command::new(runvm_bin().unwrap());
    c.args(args);
    let f = run_with_timeout(c, Duration::from_secs(60));
    assert!(!f.timed_out, "runvm {args:?} hung");
    f
}

fn assert_one_line_failure(f: &Finished, needle: &str) {
    assert_ne!(f.code, Some(0), "expected failure, stdout: {}", f.stdout);
    let err = f.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "one line expected, got:\n{err}");
    assert!(err.starts_with("runvm: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
}

#[test]
fn missing_and_non_kernel_files_are_named() {
    skip_unless!(runvm_bin().err());
    let dir = TempDir::new("bad-kernel");
    let log = dir.path().join("console.log");
    let log_s = log.to_str().unwrap();
    let f = runvm(&[
        "boot",
        "--kernel",
        "/nonexistent/vmlinux",
        "--console-log",
        log_s,
    ]);
    assert_one_line_failure(&f, "cannot read kernel /nonexistent/vmlinux");
    let not_kernel = dir.path().join("notes.txt");
    std::fs::write(&not_kernel, "just text\n".repeat(100)).unwrap();
    let f = runvm(&[
        "boot",
        "--kernel",
        not_kernel.to_str().unwrap(),
        "--console-log",
        log_s,
    ]);
    assert_one_line_failure(&f, "is not a kernel");
    let f = runvm(&["boot", "--kernel", "/", "--console-log", log_s]);
    assert_one_line_failure(&f, "not a regular file");
    assert!(!log.exists(), "a failed boot left its console log behind");
}

#[test]
fn missing_initramfs_and_nonsense_sizes_are_refused() {
    skip_unless!(runvm_bin().err().or_else(|| kernel().err()));
    let k = kernel().unwrap();
    let k = k.to_str().unwrap();
    let f = runvm(&["boot", "--kernel", k, "--initrd", "/nonexistent/initrd"]);
    assert_one_line_failure(&f, "cannot read initramfs /nonexistent/initrd");
    for (flag, value, needle) in [
        ("--mem", "0", "too small"),
        ("--mem", "lots", "is not a number"),
        ("--mem", "99999999999", "more than the host"),
        ("--cpus", "0", "out of range"),
        ("--cpus", "1000", "out of range"),
        ("--cpus", "-1", "--cpus"),
    ] {
        let f = runvm(&["boot", "--kernel", k, &format!("{flag}={value}")]);
        assert_one_line_failure(&f, needle);
    }
}

#[test]
fn initramfs_larger_than_guest_memory_is_refused() {
    skip_unless!(runvm_bin()
        .err()
        .or_else(|| kernel().err())
        .or_else(kvm_unavailable));
    let dir = TempDir::new("big-initrd");
    let big = dir.path().join("big.cpio");
    // Sparse: 64 MiB of initramfs for a 32 MiB guest.
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let k = kernel().unwrap();
    let f = runvm(&[
        "boot",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        big.to_str().unwrap(),
        "--mem",
        "32",
    ]);
    assert_one_line_failure(&f, "does not fit in guest memory");
}

/// Runs runvm in a private mount namespace where /dev is an empty tmpfs, so /dev/kvm is
/// missing; or as an unprivileged user, so it is not permitted.
#[test]
fn missing_or_forbidden_dev_kvm_is_explained() {
    skip_unless!(runvm_bin()
        .err()
        .or_else(|| kernel().err())
        .or_else(kvm_unavailable));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        runvm_tests::record_skip(module_path!(), "needs root to hide /dev/kvm");
        return;
    }
    let runvm = runvm_bin().unwrap();
    let k = kernel().unwrap();
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs none /dev && exec "$0" boot --kernel "$1""#)
        .arg(&runvm)
        .arg(&k);
    let f = run_with_timeout(c, Duration::from_secs(60));
    assert_one_line_failure(&f, "/dev/kvm does not exist");

    // /dev/kvm is 0600 root here when the test can drop privileges to nobody; where it is
    // world-accessible (a kvm group host), there is nothing to forbid.
    let world_rw = std::fs::metadata("/dev/kvm")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0o006)
        .unwrap_or(true);
    if !world_rw {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&runvm)
            .args(["boot", "--kernel"])
            .arg(&k);
        let f = run_with_timeout(c, Duration::from_secs(60));
        if f.stderr.contains("cannot read kernel") {
            runvm_tests::record_skip(module_path!(), "the kernel is not readable by nobody");
            return;
        }
        assert_one_line_failure(&f, "permission denied opening /dev/kvm");
    }
}
