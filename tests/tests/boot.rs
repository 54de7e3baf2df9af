//! Boots the real guest kernel with `runvm boot` and a generated initramfs whose static
//! `/init` prints, forks and execs a child, reads a file and reboots; checks that all of it
//! reached the host and that runvm exits 0. A second guest panics on purpose and runvm must
//! say so and fail. Needs /dev/kvm and the kernel that `make test` builds.

use std::process::Command;
use std::time::Duration;

use runtime_cli::initramfs::Initramfs;
use runvm_tests::{
    boot_check_init, kernel, run_with_timeout, runvm_bin, skip_unless, token, vm_test_unavailable,
    Finished, TempDir,
};

/// Generous: a cold boot takes ~10-25 s on software-emulated KVM, well under 1 s on hardware.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn write_initrd(dir: &TempDir, secret: &str) -> std::path::PathBuf {
    let mut i = Initramfs::new();
    i.base_layout()
        .file_from("init", 0o755, &boot_check_init().unwrap())
        .unwrap()
        .file("etc/boot-check", 0o644, format!("{secret}\n"));
    let path = dir.path().join("initrd.cpio");
    std::fs::write(&path, i.to_bytes()).unwrap();
    path
}

fn boot(initrd: &std::path::Path, cmdline: &str) -> Finished {
    boot_kernel(&kernel().unwrap(), initrd, cmdline)
}

fn boot_kernel(kernel: &std::path::Path, initrd: &std::path::Path, cmdline: &str) -> Finished {
    let mut cmd = Command::new(runvm_bin().unwrap());
    cmd.arg("boot")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", cmdline]);
    let f = run_with_timeout(cmd, BOOT_TIMEOUT);
    assert!(
        !f.timed_out,
        "runvm boot timed out\nstdout:\n{}\nstderr:\n{}",
        f.stdout, f.stderr
    );
    f
}

fn assert_boot_check_ran(o: &Finished, secret: &str) {
    let lines: Vec<&str> = o
        .stdout
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("boot-check: "))
        .collect();
    assert_eq!(
        o.code,
        Some(0),
        "runvm failed\nstdout:\n{}\nstderr:\n{}",
        o.stdout,
        o.stderr
    );
    assert_eq!(lines.len(), 5, "console:\n{}", o.stdout);
    assert_eq!(lines[0], "init started as pid 1");
    assert!(
        lines[1].starts_with("child running as pid "),
        "{}",
        lines[1]
    );
    assert_ne!(lines[1], "child running as pid 1");
    assert_eq!(lines[2], "child exited with 7");
    assert_eq!(lines[3], format!("file says {secret}"));
    assert_eq!(lines[4], "rebooting");
}

#[test]
fn guest_user_space_runs_and_the_vm_ends_cleanly() {
    skip_unless!(vm_test_unavailable().or_else(|| boot_check_init().err()));
    let dir = TempDir::new("boot");
    let secret = token();
    let initrd = write_initrd(&dir, &secret);
    assert_boot_check_ran(&boot(&initrd, ""), &secret);
}

/// The same guest through the Linux 64-bit boot protocol: a bzImage of the same kernel.
/// Its decompressor runs in guest ring 0, which takes over a minute on software KVM.
#[test]
fn a_bzimage_boots_through_the_linux_boot_protocol() {
    let bzimage = kernel().ok().map(|k| k.with_file_name("bzImage"));
    let missing = match &bzimage {
        Some(b) if b.exists() => None,
        Some(b) => Some(format!("no bzImage next to the kernel ({})", b.display())),
        None => None,
    };
    skip_unless!(vm_test_unavailable()
        .or_else(|| boot_check_init().err())
        .or(missing));
    let dir = TempDir::new("bzimage");
    let secret = token();
    let initrd = write_initrd(&dir, &secret);
    assert_boot_check_ran(&boot_kernel(&bzimage.unwrap(), &initrd, ""), &secret);
}

#[test]
fn a_guest_kernel_panic_is_reported_and_fails() {
    skip_unless!(vm_test_unavailable().or_else(|| boot_check_init().err()));
    let dir = TempDir::new("panic");
    let initrd = write_initrd(&dir, "unused");
    let o = boot(&initrd, "boot_check=panic");
    assert!(
        o.stdout
            .contains("boot-check: exiting to make the kernel panic"),
        "{}",
        o.stdout
    );
    assert_ne!(o.code, Some(0), "runvm must fail when the guest panics");
    let err = o.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "one line expected:\n{err}");
    assert!(
        err.contains("guest kernel panic: Kernel panic - not syncing: Attempted to kill init!"),
        "{err}"
    );
}
