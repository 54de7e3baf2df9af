//! Snapshot and restore of a whole VM, through `runvm boot`: a guest whose static `/init`
//! counts (a line `count N at T ms` every 200 ms, T its monotonic clock) is saved once
//! the console shows `count 5`, and resumed by two new VMM processes at once from the
//! same files: each continues with the next number, without booting again, and its
//! monotonic clock continues from where it stopped rather than jumping by the time the
//! snapshot lay on disk. Snapshots that are corrupted, truncated or of another VM shape
//! are refused in one line before anything runs. Needs /dev/kvm and the kernel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use runtime_cli::initramfs::Initramfs;
use runvm_tests::{
    boot_check_init, fails_with, kernel, ok, run_with_timeout, runvm_bin, skip_unless,
    vm_test_unavailable, Finished, SmallDisk, TempDir,
};

const T: Duration = Duration::from_secs(300);
/// How long the snapshot waits on disk before it is restored.
const ON_DISK: Duration = Duration::from_secs(10);

fn boot(initrd: &Path, extra: &[&str]) -> Finished {
    let mut cmd = Command::new(runvm_bin().unwrap());
    cmd.arg("--kernel")
        .arg(kernel().unwrap())
        .arg("--initrd")
        .arg(initrd)
        .args(["boot", "--cmdline", "boot_check=count"])
        .args(extra);
    run_with_timeout(cmd, T)
}

/// The `(N, T)` of every count line.
fn counts(console: &str) -> Vec<(u32, i64)> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("boot-check: count "))
        .filter_map(|l| {
            let (n, rest) = l.split_once(" at ")?;
            Some((n.parse().ok()?, rest.strip_suffix(" ms")?.parse().ok()?))
        })
        .collect()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A copy of snapshot `dir` (sparse, as the original) named `name`.
fn copy_of(dir: &Path, name: &str) -> PathBuf {
    let copy = dir.with_file_name(name);
    let st = Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(dir)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    copy
}

#[test]
fn a_saved_vm_continues_its_work_in_new_vmm_processes() {
    skip_unless!(vm_test_unavailable().or_else(|| boot_check_init().err()));
    let dir = TempDir::new("snapshot");
    let mut i = Initramfs::new();
    i.base_layout()
        .file_from("init", 0o755, &boot_check_init().unwrap())
        .unwrap();
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, i.to_bytes()).unwrap();
    let snap = dir.path().join("snap");
    let s = snap.to_str().unwrap();
    let first = boot(&initrd, &["--snapshot-on", "count 5 ", "--snapshot", s]);
    ok(&first, "booting and saving");
    let before = counts(&first.stdout);
    let &(last, last_ms) = before.last().expect("counted before the snapshot");
    assert!((5..=6).contains(&last), "{}", first.stdout);
    assert_eq!(mode(&snap), 0o700);
    for f in ["state", "memory"] {
        assert_eq!(mode(&snap.join(f)), 0o600, "{f}");
    }

    std::thread::sleep(ON_DISK);
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let initrd = initrd.clone();
            let s = s.to_string();
            std::thread::spawn(move || boot(&initrd, &["--restore", &s]))
        })
        .collect();
    for r in runs {
        let resumed = r.join().unwrap();
        ok(&resumed, "restoring");
        assert!(
            !resumed.stdout.contains("init started"),
            "the guest booted again:\n{}",
            resumed.stdout
        );
        let after = counts(&resumed.stdout);
        let numbers: Vec<u32> = after.iter().map(|c| c.0).collect();
        let expected: Vec<u32> = (last + 1..=40).collect();
        assert_eq!(numbers, expected, "{}", resumed.stdout);
        let gap = after[0].1 - last_ms;
        assert!(
            gap < (ON_DISK.as_millis() as i64) / 2,
            "the guest's monotonic clock jumped by {gap} ms across the restore"
        );
        assert!(resumed.stdout.contains("boot-check: rebooting"));
    }
    refusals(&initrd, &snap);
    full_disk(&initrd);
}

/// A snapshot that does not fit on its file system fails in one line and leaves nothing.
fn full_disk(initrd: &Path) {
    let disk = SmallDisk::new(8);
    let dir = disk.path().join("snap");
    let f = boot(
        initrd,
        &[
            "--snapshot-on",
            "count 2 ",
            "--snapshot",
            dir.to_str().unwrap(),
        ],
    );
    fails_with(&f, "No space left on device");
    assert!(!dir.exists(), "a failed snapshot leaves nothing");
}

/// Snapshots that must be refused, each with one line and no guest output.
fn refusals(initrd: &Path, snap: &Path) {
    let refused = |dir: &Path, extra: &[&str], needle: &str| {
        let mut args = vec!["--restore", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let f = boot(initrd, &args);
        fails_with(&f, needle);
        assert!(counts(&f.stdout).is_empty(), "{}", f.stdout);
    };
    let corrupt = copy_of(snap, "corrupt");
    let state = corrupt.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x20;
    std::fs::write(&state, bytes).unwrap();
    refused(&corrupt, &[], "checksum does not match");

    let truncated = copy_of(snap, "truncated");
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory"))
        .unwrap();
    memory.set_len(64 << 20).unwrap();
    refused(&truncated, &[], "truncated");
    let short_state = truncated.join("state");
    let text = std::fs::read(&short_state).unwrap();
    std::fs::write(&short_state, &text[..text.len() / 2]).unwrap();
    refused(&truncated, &[], "truncated");

    refused(snap, &["--mem", "256"], "another VM shape (memory differ)");
    refused(&snap.with_file_name("missing"), &[], "No such file");
}
