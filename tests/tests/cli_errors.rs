//! Bad input to the runc-style commands: one clear line on stderr (and in the --log file,
//! as JSON when asked), a non-zero exit, and no state directory or process left behind.

use std::path::Path;
use std::time::Duration;

use runvm_tests::{busybox, fails_with, runvm, runvm_bin, skip_unless, TempDir, TestBundle};

const QUICK: Duration = Duration::from_secs(120);

/// No container state and no runvm process mentioning `root` remain.
fn nothing_left(root: &Path) {
    let dirs: Vec<_> = std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(dirs.is_empty(), "state left behind: {dirs:?}");
    // Whole arguments only: another test's root may have this one as a prefix.
    let needle = root.to_string_lossy().into_owned();
    let inside = format!("{needle}/");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let mentions = cmd
                .split(|b| *b == 0)
                .map(String::from_utf8_lossy)
                .any(|a| a == needle || a.starts_with(&inside));
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            assert!(!mentions, "process left behind: {cmd}");
        }
    }
}

fn unavailable() -> Option<String> {
    runvm_bin().err().or_else(|| busybox().err())
}

#[test]
fn malformed_configs_are_refused_before_anything_exists() {
    skip_unless!(unavailable());
    let root = TempDir::new("root");
    let cases: [(&str, &str); 4] = [
        ("{\"ociVersion\": \"1.0.2\", \"process\": ", "not a valid OCI config"),
        ("{\"ociVersion\": \"1.0.2\", \"root\": {\"path\": 42}}", "not a valid OCI config"),
        ("{\"ociVersion\": \"2.0.0\", \"root\": {\"path\": \"rootfs\"}, \"process\": {\"args\": [\"sh\"], \"cwd\": \"/\", \"user\": {\"uid\": 0, \"gid\": 0}}}", "ociVersion \"2.0.0\" is not supported"),
        ("[]", "not a valid OCI config"),
    ];
    for (i, (config, needle)) in cases.iter().enumerate() {
        let b = TestBundle::new("badcfg", &["true"]);
        std::fs::write(b.path().join("config.json"), config).unwrap();
        let id = format!("c{i}");
        fails_with(
            &runvm(
                root.path(),
                &["create", "--bundle", &b.path().to_string_lossy(), &id],
                QUICK,
            ),
            needle,
        );
    }
    nothing_left(root.path());
}

#[test]
fn bad_ids_paths_and_sockets_are_refused() {
    skip_unless!(unavailable());
    let root = TempDir::new("root");
    let b = TestBundle::new("bad", &["true"]);
    let bundle = b.path().to_string_lossy().into_owned();
    let long = "x".repeat(1000);
    for id in ["a/b", "..", "../escape", long.as_str(), ""] {
        fails_with(
            &runvm(root.path(), &["create", "--bundle", &bundle, id], QUICK),
            "invalid container id",
        );
    }
    fails_with(
        &runvm(
            root.path(),
            &[
                "create",
                "--bundle",
                &bundle,
                "--pid-file",
                "/no/such/dir/pid",
                "c1",
            ],
            QUICK,
        ),
        "pid file directory /no/such/dir does not exist",
    );
    fails_with(
        &runvm(
            root.path(),
            &[
                "create",
                "--bundle",
                &bundle,
                "--console-socket",
                "/no/such/socket",
                "c1",
            ],
            QUICK,
        ),
        "console socket /no/such/socket does not exist",
    );
    let mut tty = TestBundle::new("tty", &["sh"]);
    tty.edit(|c| c["process"]["terminal"] = true.into());
    fails_with(
        &runvm(
            root.path(),
            &["create", "--bundle", &tty.path().to_string_lossy(), "c1"],
            QUICK,
        ),
        "console-socket",
    );
    std::fs::remove_dir_all(b.rootfs()).unwrap();
    fails_with(
        &runvm(root.path(), &["create", "--bundle", &bundle, "c1"], QUICK),
        "rootfs",
    );
    fails_with(
        &runvm(
            root.path(),
            &["create", "--bundle", "/no/such/bundle", "c1"],
            QUICK,
        ),
        "bundle /no/such/bundle",
    );
    nothing_left(root.path());
}

#[test]
fn unknown_containers_and_signals_are_errors() {
    skip_unless!(unavailable());
    let root = TempDir::new("root");
    for verb in [
        "state", "start", "delete", "pause", "resume", "ps", "events",
    ] {
        fails_with(
            &runvm(root.path(), &[verb, "ghost"], QUICK),
            "container ghost does not exist",
        );
    }
    fails_with(
        &runvm(root.path(), &["kill", "ghost", "TERM"], QUICK),
        "container ghost does not exist",
    );
    fails_with(
        &runvm(root.path(), &["kill", "ghost", "NOTASIGNAL"], QUICK),
        "invalid signal",
    );
    fails_with(
        &runvm(root.path(), &["exec", "ghost", "true"], QUICK),
        "container ghost does not exist",
    );
    let f = runvm(root.path(), &["list", "-q"], QUICK);
    assert_eq!((f.code, f.stdout.as_str()), (Some(0), ""));
    nothing_left(root.path());
}

#[test]
fn a_missing_kernel_fails_create_cleanly_and_the_log_file_says_why_in_json() {
    skip_unless!(unavailable());
    let root = TempDir::new("root");
    let logs = TempDir::new("logs");
    let log = logs.path().join("log.json");
    let b = TestBundle::new("nokernel", &["true"]);
    let f = runvm(
        root.path(),
        &[
            "--log",
            &log.to_string_lossy(),
            "--log-format",
            "json",
            "--kernel",
            "/no/such/vmlinux",
            "create",
            "--bundle",
            &b.path().to_string_lossy(),
            "c1",
        ],
        QUICK,
    );
    fails_with(&f, "/no/such/vmlinux");
    let text = std::fs::read_to_string(&log).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "error");
    assert!(
        last["msg"].as_str().unwrap().contains("/no/such/vmlinux"),
        "{last}"
    );
    assert!(last["time"].as_str().unwrap().ends_with('Z'));
    nothing_left(root.path());
}

/// Every cgroup directory for `rel` on this host (the v2 one, or one per v1 hierarchy).
fn cgroup_dirs_for(rel: &str) -> Vec<std::path::PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.join(rel)];
    }
    std::fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("cgroup.procs").exists())
        .map(|e| e.path().join(rel))
        .collect()
}

#[test]
fn a_cgroup_another_process_uses_is_refused_and_left_alone() {
    skip_unless!(unavailable());
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to make a cgroup");
        return;
    }
    let rel = format!("runvm-test-inuse-{}", runvm_tests::token());
    let dirs = cgroup_dirs_for(&rel);
    let mut sleeper = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let mut joined = 0;
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
        // A v1 cpuset cgroup takes no process before its cpus and mems are set.
        joined += std::fs::write(d.join("cgroup.procs"), sleeper.id().to_string()).is_ok() as u32;
    }
    assert!(joined > 0, "the sleeper joined no cgroup");
    let root = TempDir::new("root");
    let mut b = TestBundle::new("inuse", &["true"]);
    b.edit(|c| c["linux"]["cgroupsPath"] = format!("/{rel}").into());
    let f = runvm(
        root.path(),
        &["create", "--bundle", &b.path().to_string_lossy(), "inuse1"],
        QUICK,
    );
    let alive = sleeper.try_wait().unwrap().is_none();
    let kept = dirs.iter().all(|d| d.is_dir());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    for d in &dirs {
        let _ = std::fs::remove_dir(d);
    }
    fails_with(
        &f,
        "is in use by 1 other process(es): each container needs its own",
    );
    assert!(alive && kept, "the other user of the cgroup was disturbed");
    nothing_left(root.path());
}

#[test]
fn a_network_namespace_path_that_is_none_is_refused() {
    skip_unless!(unavailable());
    let root = TempDir::new("root");
    let cases = [
        (
            "/no/such/netns",
            "network namespace /no/such/netns: No such file",
        ),
        (
            "/proc/self/ns/uts",
            "/proc/self/ns/uts is not a network namespace",
        ),
        ("/etc/hostname", "/etc/hostname is not a network namespace"),
    ];
    for (i, (path, needle)) in cases.iter().enumerate() {
        let mut b = TestBundle::new("badns", &["true"]);
        b.edit(|c| {
            let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
            ns.retain(|n| n["type"] != "network");
            ns.push(serde_json::json!({"type": "network", "path": path}));
        });
        let id = format!("n{i}");
        let f = runvm(
            root.path(),
            &["create", "--bundle", &b.path().to_string_lossy(), &id],
            QUICK,
        );
        fails_with(&f, needle);
    }
    nothing_left(root.path());
}
