//! The OCI lifecycle through the runvm binary with real VMs and busybox bundles: `run` in
//! the foreground (status, separated output, the rootfs and bind mounts through the share);
//! create/start/state/ps/exec/pause/resume/kill/delete with every wrong-state error,
//! hooks, resources and cgroups, private state; SIGKILL; delete --force; a terminal over a console socket.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use runvm_tests::{
    assert_private_state, container_test_unavailable, fails_with, ok, pid_alive, runvm,
    runvm_to_files, skip_unless, token, ContainerGuard, TempDir, TestBundle,
};

/// One VM boot and container setup on software KVM takes ~25 s.
const T: Duration = Duration::from_secs(300);
const QUICK: Duration = Duration::from_secs(60);

fn state(root: &Path, id: &str) -> serde_json::Value {
    let f = runvm(root, &["state", id], QUICK);
    ok(&f, "state");
    serde_json::from_str(&f.stdout).unwrap()
}

fn wait_status(root: &Path, id: &str, want: &str) {
    let deadline = Instant::now() + QUICK;
    loop {
        if state(root, id)["status"] == want {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never became {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn run_in_the_foreground_gives_status_output_and_the_share() {
    skip_unless!(container_test_unavailable());
    let root = TempDir::new("root");
    let host = TempDir::new("host");
    let secret = token();
    std::fs::write(host.path().join("in.txt"), &secret).unwrap();
    std::fs::create_dir_all(host.path().join("rw")).unwrap();
    std::fs::create_dir_all(host.path().join("ro")).unwrap();
    std::fs::write(host.path().join("ro/kept"), "kept").unwrap();
    let script = "echo out; echo err >&2; ls /; cat /data/in.txt; echo; \
                  echo written > /root/w.txt; echo shared > /rw/new.txt; \
                  (echo x > /ro/f) 2>/dev/null && echo ro-writable || echo ro-refused; exit 3";
    let mut b = TestBundle::new("fg", &["sh", "-c", script]);
    let h = host.path().to_string_lossy().into_owned();
    b.edit(|c| {
        let mounts = c["mounts"].as_array_mut().unwrap();
        mounts.push(serde_json::json!({"destination": "/data/in.txt", "type": "bind", "source": format!("{h}/in.txt"), "options": ["rbind", "ro"]}));
        mounts.push(serde_json::json!({"destination": "/rw", "type": "bind", "source": format!("{h}/rw"), "options": ["rbind", "rw"]}));
        mounts.push(serde_json::json!({"destination": "/ro", "type": "bind", "source": format!("{h}/ro"), "options": ["rbind", "ro"]}));
    });
    let f = runvm(
        root.path(),
        &["run", "--bundle", &b.path().to_string_lossy(), "fg1"],
        T,
    );
    assert_eq!(
        f.code,
        Some(3),
        "stdout: {}\nstderr: {}",
        f.stdout,
        f.stderr
    );
    assert_eq!(f.stderr, "err\n");
    let lines: Vec<&str> = f.stdout.lines().collect();
    assert_eq!(lines[0], "out");
    assert!(
        lines.contains(&"bin") && lines.contains(&"proc") && lines.contains(&"data"),
        "{}",
        f.stdout
    );
    assert!(f.stdout.contains(&secret), "{}", f.stdout);
    assert!(f.stdout.contains("ro-refused"), "{}", f.stdout);
    assert_eq!(
        std::fs::read_to_string(b.rootfs().join("root/w.txt")).unwrap(),
        "written\n"
    );
    let new = host.path().join("rw/new.txt");
    assert_eq!(std::fs::read_to_string(&new).unwrap(), "shared\n");
    assert_eq!(
        std::fs::metadata(&new).unwrap().uid(),
        0,
        "root in the container is root on the host"
    );
    assert!(!host.path().join("ro/f").exists());
    // Nothing left: no state, no VMM, no cgroup (the default path, /runvm-<id>).
    assert!(
        std::fs::read_dir(root.path()).unwrap().next().is_none(),
        "state left behind"
    );
    for d in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        assert!(
            !d.path().join("runvm-fg1").exists(),
            "cgroup left in {}",
            d.path().display()
        );
    }
    assert!(
        !Path::new("/sys/fs/cgroup/runvm-fg1").exists(),
        "cgroup left"
    );
}

#[test]
fn the_detached_lifecycle_hooks_resources_and_wrong_states() {
    skip_unless!(container_test_unavailable());
    let root = TempDir::new("root");
    let hooks = TempDir::new("hooks");
    let hp = hooks.path().to_string_lossy().into_owned();
    let mut b = TestBundle::new(
        "life",
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 42' TERM; echo started; while true; do sleep 1; done",
        ],
    );
    let cgroup = format!("/runvm-test/{}", token());
    b.edit(|c| {
        let hook = |name: &str| serde_json::json!([{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {hp}/{name}")]}]);
        c["hooks"] = serde_json::json!({
            "createRuntime": hook("createRuntime"),
            "createContainer": hook("createContainer"),
            "startContainer": hook("startContainer"),
            "poststart": hook("poststart"),
            "poststop": hook("poststop"),
        });
        c["linux"]["resources"] = serde_json::json!({"memory": {"limit": 200 * 1024 * 1024}, "pids": {"limit": 100}, "cpu": {"cpus": "0"}});
        c["linux"]["cgroupsPath"] = cgroup.clone().into();
        c["annotations"] = serde_json::json!({"org.example.test": "yes"});
    });
    let bundle = b.path().to_string_lossy().into_owned();
    let pid_file = root.path().join("c.pid");
    let id = "life1";
    let r = root.path();
    let _guard = ContainerGuard::new(r, &[id]);

    // A cgroup an earlier container left with a CPU quota this spec does not set.
    let stale = format!("/sys/fs/cgroup/cpu{cgroup}");
    let v1 = std::path::Path::new("/sys/fs/cgroup/cpu").is_dir();
    if v1 {
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(format!("{stale}/cpu.cfs_quota_us"), "10000").unwrap();
    }
    let out = root.path().join("container.out");
    let f = runvm_to_files(
        r,
        &[
            "create",
            "--bundle",
            &bundle,
            "--pid-file",
            &pid_file.to_string_lossy(),
            id,
        ],
        &out,
        T,
    );
    ok(&f, "create");
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert!(pid_alive(pid));
    let s = state(r, id);
    assert_eq!(
        (s["status"].as_str(), s["pid"].as_i64()),
        (Some("created"), Some(pid as i64))
    );
    assert_eq!(s["annotations"]["org.example.test"], "yes");
    assert_eq!(s["ociVersion"], "1.2.0");
    let created: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hooks.path().join("createRuntime")).unwrap())
            .unwrap();
    assert_eq!(
        (created["id"].as_str(), created["status"].as_str()),
        (Some(id), Some("created"))
    );
    assert!(hooks.path().join("createContainer").exists());
    assert!(!hooks.path().join("startContainer").exists());
    assert_private_state(r, id);
    assert!(
        pid_alive(pid),
        "the VMM survived the attempts of another user"
    );
    // The VMM is the container in the host's accounting.
    if let Ok(procs) =
        std::fs::read_to_string(format!("/sys/fs/cgroup/memory{cgroup}/cgroup.procs"))
    {
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "VMM not in its cgroup: {procs}"
        );
        let limit = std::fs::read_to_string(format!(
            "/sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes"
        ))
        .unwrap();
        // The guest's 200 MiB plus the VMM's own allowance.
        assert_eq!(limit.trim(), ((200u64 + 64) << 20).to_string());
    }
    if v1 {
        let read = |f: &str| std::fs::read_to_string(f).unwrap().trim().to_string();
        assert_eq!(
            read(&format!("{stale}/cpu.cfs_quota_us")),
            "-1",
            "stale quota reset"
        );
        let cpus = format!("/sys/fs/cgroup/cpuset{cgroup}/cpuset.cpus");
        assert_eq!(read(&cpus), "0", "cpuset.cpus from the spec");
    }
    fails_with(
        &runvm(r, &["create", "--bundle", &bundle, id], QUICK),
        "already exists",
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "",
        "the process ran before start"
    );
    fails_with(&runvm(r, &["pause", id], QUICK), "created");
    fails_with(&runvm(r, &["resume", id], QUICK), "created");

    ok(&runvm(r, &["start", id], T), "start");
    assert_eq!(state(r, id)["status"], "running");
    fails_with(&runvm(r, &["start", id], QUICK), "running");
    let poststart: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hooks.path().join("poststart")).unwrap())
            .unwrap();
    assert_eq!(poststart["status"], "running");
    assert!(hooks.path().join("startContainer").exists());

    // JSON: host pids (the VMM); the table: the guest's (its init is 1 in its pid namespace).
    let f = runvm(r, &["ps", "--format", "json", id], QUICK);
    ok(&f, "ps");
    let pids: Vec<i32> = serde_json::from_str(&f.stdout).unwrap();
    assert_eq!(pids, [pid], "{pids:?}");
    let f = runvm(r, &["ps", id], QUICK);
    ok(&f, "ps");
    assert!(
        f.stdout.lines().skip(1).any(|l| l.trim() == "1"),
        "{}",
        f.stdout
    );

    let f = runvm(
        r,
        &[
            "exec",
            id,
            "sh",
            "-c",
            "echo exec-out; echo exec-err >&2; grep MemTotal /proc/meminfo; exit 5",
        ],
        T,
    );
    assert_eq!(f.code, Some(5), "{f:?}");
    assert!(f.stdout.starts_with("exec-out\n"), "{}", f.stdout);
    assert_eq!(f.stderr, "exec-err\n");
    let mem_kib: u64 = f
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        mem_kib > 150 * 1024 && mem_kib <= 200 * 1024,
        "guest memory {mem_kib} KiB for a 200 MiB limit"
    );
    fails_with(&runvm(r, &["exec", id, "no-such-program"], T), "not found");

    ok(&runvm(r, &["pause", id], QUICK), "pause");
    assert_eq!(state(r, id)["status"], "paused");
    fails_with(&runvm(r, &["pause", id], QUICK), "paused");
    ok(&runvm(r, &["resume", id], QUICK), "resume");
    assert_eq!(state(r, id)["status"], "running");
    fails_with(&runvm(r, &["delete", id], QUICK), "running");

    ok(&runvm(r, &["kill", id, "TERM"], QUICK), "kill");
    wait_status(r, id, "stopped");
    // The container's own output went where create's stdout went.
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "started\ngot-term\n"
    );
    assert!(!pid_alive(pid));
    assert_eq!(
        std::fs::read_to_string(r.join(id).join("exit"))
            .unwrap()
            .trim(),
        "42"
    );
    fails_with(&runvm(r, &["kill", id, "TERM"], QUICK), "not running");
    fails_with(&runvm(r, &["start", id], QUICK), "stopped");
    ok(&runvm(r, &["delete", id], QUICK), "delete");
    assert!(!r.join(id).exists());
    let poststop: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hooks.path().join("poststop")).unwrap())
            .unwrap();
    assert_eq!(poststop["id"], id);
    fails_with(&runvm(r, &["state", id], QUICK), "does not exist");
    fails_with(&runvm(r, &["delete", id], QUICK), "does not exist");
    // delete removed the container's cgroups; the test's parent goes too.
    for d in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        assert!(
            !d.path().join(cgroup.trim_start_matches('/')).exists(),
            "cgroup left in {}",
            d.path().display()
        );
        let _ = std::fs::remove_dir(d.path().join("runvm-test"));
    }
}

#[test]
fn sigkill_ends_the_vm_and_delete_force_removes_a_running_container() {
    skip_unless!(container_test_unavailable());
    let root = TempDir::new("root");
    let r = root.path();
    let _guard = ContainerGuard::new(r, &["k1", "k2"]);
    let b = TestBundle::new("kill", &["sh", "-c", "while true; do sleep 1; done"]);
    let bundle = b.path().to_string_lossy().into_owned();
    for id in ["k1", "k2"] {
        let out = r.join(format!("{id}.out"));
        ok(
            &runvm_to_files(r, &["create", "--bundle", &bundle, id], &out, T),
            "create",
        );
        ok(&runvm(r, &["start", id], T), "start");
    }
    ok(&runvm(r, &["kill", "k1", "KILL"], QUICK), "kill");
    wait_status(r, "k1", "stopped");
    assert_eq!(
        std::fs::read_to_string(r.join("k1/exit")).unwrap().trim(),
        "137"
    );
    ok(&runvm(r, &["delete", "k1"], QUICK), "delete");

    let pid = state(r, "k2")["pid"].as_i64().unwrap() as i32;
    let f = runvm(r, &["list", "--format", "json"], QUICK);
    ok(&f, "list");
    let list: serde_json::Value = serde_json::from_str(&f.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    ok(
        &runvm(r, &["delete", "--force", "k2"], QUICK),
        "delete --force",
    );
    assert!(!pid_alive(pid), "the VMM survived delete --force");
    let left: Vec<_> = std::fs::read_dir(r)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert!(left.is_empty(), "state left behind: {left:?}");
}

/// Receives the pty master a console socket gets.
fn receive_master(listener: &UnixListener) -> OwnedFd {
    let (s, _) = listener.accept().unwrap();
    let mut buf = [0u8; 256];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = nix::sys::socket::recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    for c in msg.cmsgs().unwrap() {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: SCM_RIGHTS gave us this descriptor.
            return unsafe { OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no descriptor on the console socket");
}

#[test]
fn a_terminal_goes_over_the_console_socket_and_follows_resizes() {
    skip_unless!(container_test_unavailable());
    let root = TempDir::new("root");
    let sock_dir = TempDir::new("console");
    let sock = sock_dir.path().join("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut b = TestBundle::new(
        "tty",
        &["sh", "-c", "tty; stty size; read x; stty size; exit 7"],
    );
    b.edit(|c| {
        c["process"]["terminal"] = true.into();
        c["process"]["consoleSize"] = serde_json::json!({"height": 24, "width": 80});
    });
    let bundle = b.path().to_string_lossy().into_owned();
    let sock_s = sock.to_string_lossy().into_owned();
    let root_p = root.path().to_path_buf();
    let runner = std::thread::spawn(move || {
        runvm(
            &root_p,
            &[
                "run",
                "--console-socket",
                &sock_s,
                "--bundle",
                &bundle,
                "tty1",
            ],
            T,
        )
    });
    let master = std::fs::File::from(receive_master(&listener));
    let mut seen = String::new();
    let read_until = |master: &std::fs::File, seen: &mut String, needle: &str| {
        let deadline = Instant::now() + T;
        let mut buf = [0u8; 512];
        while !seen.contains(needle) {
            assert!(
                Instant::now() < deadline,
                "never saw {needle:?} in {seen:?}"
            );
            let n = std::io::Read::read(&mut &*master, &mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    read_until(&master, &mut seen, "24 80");
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    let ws = libc::winsize {
        ws_row: 30,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0);
    // The resize travels as SIGWINCH to the VMM and then to the guest: give it a moment.
    std::thread::sleep(Duration::from_secs(3));
    std::io::Write::write_all(&mut &master, b"go\n").unwrap();
    read_until(&master, &mut seen, "30 100");
    let f = runner.join().unwrap();
    assert_eq!(f.code, Some(7), "{f:?}");
}
