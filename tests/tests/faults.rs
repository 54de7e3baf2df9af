//! Faults during a container's life, through the runvm binary with real VMs: the VMM
//! SIGKILLed while `create` boots it, once its agent is ready, and while the hooks run
//! (a hook kills it), a VMM that dies after `create` (and inherits none of
//! its caller's descriptors, and lives confined), an agent that stops answering, a guest
//! that dies (its agent exits, its kernel panics) next to a healthy container, and a
//! state file system that fills up. After each,
//! the CLI says what happened in one line and nothing is left: no state directory, no
//! cgroup, no process, no mount.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use runvm_tests::{
    container_test_unavailable, ok, pid_alive, proc_status, runvm, runvm_to_files, skip_unless,
    token, ContainerGuard, SmallDisk, TempDir, TestBundle,
};

/// One VM boot and container setup on software KVM takes ~25 s.
const T: Duration = Duration::from_secs(300);
const QUICK: Duration = Duration::from_secs(60);

/// Every directory cgroup `path` has on this host (one per v1 controller, or the v2 one).
fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let rel = path.trim_start_matches('/');
    let mut dirs = vec![Path::new("/sys/fs/cgroup").join(rel)];
    for d in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        dirs.push(d.path().join(rel));
    }
    dirs.into_iter().filter(|d| d.is_dir()).collect()
}

/// The first pid in cgroup `path`, waiting up to `QUICK` for one.
fn first_member(path: &str) -> i32 {
    let deadline = Instant::now() + QUICK;
    loop {
        for d in cgroup_dirs(path) {
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                if let Some(pid) = procs.lines().next().and_then(|l| l.parse().ok()) {
                    return pid;
                }
            }
        }
        assert!(Instant::now() < deadline, "no VMM joined cgroup {path}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Nothing of container `id` under `root` or in cgroup `path` is left.
fn assert_nothing_left(root: &Path, id: &str, cgroup: &str, vmm: i32) {
    assert!(!pid_alive(vmm), "the VMM {vmm} is still there");
    assert!(!root.join(id).exists(), "state directory left");
    assert_eq!(cgroup_dirs(cgroup), Vec::<PathBuf>::new(), "cgroup left");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let r = format!("{}/", root.display());
    assert!(!mounts.contains(&r), "a mount under {r} is left:\n{mounts}");
}

fn bundle(tag: &str, cgroup: &str) -> TestBundle {
    let mut b = TestBundle::new(tag, &["sh", "-c", "while true; do sleep 1; done"]);
    b.edit(|c| {
        c["linux"]["cgroupsPath"] = cgroup.into();
        c["linux"]["resources"] = serde_json::json!({"pids": {"limit": 50}});
    });
    b
}

/// Removes the tests' parent cgroup where it is empty.
fn remove_test_parent() {
    for d in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_dir(d.path().join("runvm-test"));
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join("runvm-test"));
}

#[test]
fn a_vmm_killed_while_create_boots_it_leaves_nothing() {
    skip_unless!(container_test_unavailable());
    let root = TempDir::new("root");
    let r = root.path().to_path_buf();
    let _guard = ContainerGuard::new(&r, &["boot1"]);
    let cgroup = format!("/runvm-test/{}", token());
    let b = bundle("fault-boot", &cgroup);
    let bundle_path = b.path().to_string_lossy().into_owned();
    let rr = r.clone();
    let create =
        std::thread::spawn(move || runvm(&rr, &["create", "--bundle", &bundle_path, "boot1"], T));
    // The VMM joins its cgroup before it boots the VM.
    let vmm = first_member(&cgroup);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let f = create.join().unwrap();
    assert_ne!(f.code, Some(0), "create succeeded with its VMM killed");
    let err = f.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "one line expected:\n{err}");
    assert_nothing_left(&r, "boot1", &cgroup, vmm);
    remove_test_parent();
}

#[test]
fn a_vmm_that_dies_after_create_is_stopped_and_deleted_cleanly() {
    skip_unless!(container_test_unavailable());
    let root = TempDir::new("root");
    let r = root.path();
    let _guard = ContainerGuard::new(r, &["dead1"]);
    let cgroup = format!("/runvm-test/{}", token());
    let b = bundle("fault-dead", &cgroup);
    let pid_file = r.join("dead1.pid");
    // A descriptor the caller leaks into runvm (no close-on-exec) must not reach the VMM.
    let leaked = r.join("leaked");
    let leak = std::fs::File::create(&leaked).unwrap();
    let mut c = std::process::Command::new(runvm_tests::runvm_bin().unwrap());
    c.arg("--root")
        .arg(r)
        .arg("create")
        .arg("--bundle")
        .arg(b.path());
    c.arg("--pid-file").arg(&pid_file).arg("dead1");
    c.stdout(std::fs::File::create(r.join("dead1.out")).unwrap());
    c.stderr(std::fs::File::create(r.join("dead1.err")).unwrap());
    let raw = std::os::fd::AsRawFd::as_raw_fd(&leak);
    // SAFETY: between fork and exec only dup2 onto a descriptor nothing else uses.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
            if libc::dup2(raw, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let status = c.status().unwrap();
    let err = std::fs::read_to_string(r.join("dead1.err")).unwrap();
    assert!(status.success(), "create: {err}");
    let vmm: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    for fd in std::fs::read_dir(format!("/proc/{vmm}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert_ne!(target, leaked, "the VMM inherited fd {:?}", fd.file_name());
    }
    assert_confined(vmm, r, "dead1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_dead(vmm, QUICK);
    let f = runvm(r, &["state", "dead1"], QUICK);
    ok(&f, "state");
    let s: serde_json::Value = serde_json::from_str(&f.stdout).unwrap();
    assert_eq!(s["status"], "stopped");
    let start = runvm(r, &["start", "dead1"], QUICK);
    assert_ne!(start.code, Some(0), "start of a dead container succeeded");
    ok(&runvm(r, &["delete", "dead1"], QUICK), "delete");
    assert_nothing_left(r, "dead1", &cgroup, vmm);
    remove_test_parent();
}

/// The VMM `vmm` of container `id` lives in its minimal root (read-only, with its state
/// directory, two device nodes and no host file system), under seccomp and no_new_privs.
fn assert_confined(vmm: i32, root: &Path, id: &str) {
    let jail = PathBuf::from(format!("/proc/{vmm}/root"));
    let state = jail.join(root.strip_prefix("/").unwrap()).join(id);
    assert!(
        state.join("state.json").is_file(),
        "no state in the VMM's root"
    );
    for host in ["etc", "usr", "bin", "home", "var"] {
        assert!(!jail.join(host).exists(), "the VMM sees the host's /{host}");
    }
    let mut devs: Vec<String> = std::fs::read_dir(jail.join("dev"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    assert_eq!(devs, ["kvm", "null"], "device nodes in the VMM's root");
    let write = std::fs::write(jail.join("x"), "x").map_err(|e| e.raw_os_error());
    assert_eq!(write, Err(Some(libc::EROFS)), "the VMM's root is writable");
    for (field, value) in [("Seccomp", "2"), ("NoNewPrivs", "1")] {
        assert_eq!(
            proc_status(vmm, field).as_deref(),
            Some(value),
            "{field} of the VMM"
        );
    }
}

/// The pid `state` reports for `id`.
fn state_pid(root: &Path, id: &str) -> i32 {
    let f = runvm(root, &["state", id], QUICK);
    ok(&f, "state");
    let s: serde_json::Value = serde_json::from_str(&f.stdout).unwrap();
    s["pid"].as_i64().unwrap() as i32
}

fn wait_dead(pid: i32, bound: Duration) {
    let deadline = Instant::now() + bound;
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_dying_guest_and_a_full_state_file_system_leave_nothing() {
    skip_unless!(container_test_unavailable());
    let root = TempDir::new("root");
    let r = root.path().to_path_buf();
    let fs = SmallDisk::on(&r, 16);
    let _guard = ContainerGuard::new(&r, &["crash1", "full1", "full2"]);
    let (cg_crash, cg_full) = (
        format!("/runvm-test/{}", token()),
        format!("/runvm-test/{}", token()),
    );
    let mut crash = bundle("fault-crash", &cg_crash);
    let kernel = runvm_tests::kernel().unwrap();
    let initrd = runvm_tests::artifact("RUNVM_INITRD", "agent initramfs").unwrap();
    crash.edit(|c| {
        // The agent exits a second after the container starts: the guest kernel panics.
        c["vm"] = serde_json::json!({"kernel": {
            "path": kernel, "initrd": initrd, "parameters": ["RUNVM_AGENT_TEST_FAULT=crash"]
        }});
        // A shape of its own that no other container uses: no template is made for it.
        c["annotations"]["run.oci.runvm.template"] = "false".into();
    });
    let full = bundle("fault-full", &cg_full);
    // Both boot at once.
    let creates: Vec<_> = [("crash1", crash.path()), ("full1", full.path())]
        .into_iter()
        .map(|(id, b)| {
            let (rr, b) = (r.clone(), b.to_string_lossy().into_owned());
            let out = r.join(format!("{id}.out"));
            std::thread::spawn(move || {
                runvm_to_files(&rr, &["create", "--bundle", &b, id], &out, T)
            })
        })
        .collect();
    for c in creates {
        ok(&c.join().unwrap(), "create");
    }
    let (vmm_crash, vmm_full) = (state_pid(&r, "crash1"), state_pid(&r, "full1"));
    ok(&runvm(&r, &["start", "crash1"], QUICK), "start crash1");
    ok(&runvm(&r, &["start", "full1"], QUICK), "start full1");
    fs.fill("filler");
    let cg_full2 = format!("/runvm-test/{}", token());
    let full2 = bundle("fault-full2", &cg_full2);
    let f = runvm(
        &r,
        &[
            "create",
            "--bundle",
            &full2.path().to_string_lossy(),
            "full2",
        ],
        T,
    );
    assert_ne!(f.code, Some(0), "create on a full file system succeeded");
    assert_eq!(f.stderr.trim_end().lines().count(), 1, "{}", f.stderr);
    assert!(!r.join("full2").exists(), "state of the failed create left");
    // A change of state that cannot be recorded is not made.
    let f = runvm(&r, &["pause", "full1"], QUICK);
    assert_ne!(f.code, Some(0), "pause recorded on a full file system");
    wait_dead(vmm_crash, QUICK);
    let f = runvm(&r, &["state", "crash1"], QUICK);
    ok(&f, "state crash1");
    assert!(f.stdout.contains("\"stopped\""), "{}", f.stdout);
    let f = runvm(&r, &["state", "full1"], QUICK);
    assert!(
        f.stdout.contains("\"running\""),
        "the other container: {}",
        f.stdout
    );
    ok(&runvm(&r, &["kill", "full1", "KILL"], QUICK), "kill full1");
    wait_dead(vmm_full, QUICK);
    ok(&runvm(&r, &["delete", "crash1"], QUICK), "delete crash1");
    ok(&runvm(&r, &["delete", "full1"], QUICK), "delete full1");
    std::fs::remove_file(r.join("filler")).unwrap();
    assert_nothing_left(&r, "crash1", &cg_crash, vmm_crash);
    assert_nothing_left(&r, "full1", &cg_full, vmm_full);
    assert_eq!(
        cgroup_dirs(&cg_full2),
        Vec::<PathBuf>::new(),
        "cgroup of full2 left"
    );
    remove_test_parent();
}

/// Runs `args`, asserting it ends on its own within `bound`; returns whether it succeeded.
fn returns_within(root: &Path, args: &[&str], bound: Duration) -> bool {
    let started = Instant::now();
    let f = runvm(root, args, bound + QUICK);
    let took = started.elapsed();
    assert!(
        !f.timed_out && took <= bound,
        "`runvm {}` took {took:?} (bound {bound:?}); stderr: {}",
        args.join(" "),
        f.stderr
    );
    f.code == Some(0)
}

#[test]
fn an_agent_that_stops_answering_never_hangs_a_command() {
    skip_unless!(container_test_unavailable());
    let root = TempDir::new("root");
    let r = root.path();
    let _guard = ContainerGuard::new(r, &["stall1"]);
    let mut b = TestBundle::new("fault-stall", &["sh", "-c", "while true; do sleep 1; done"]);
    let kernel = runvm_tests::kernel().unwrap();
    let initrd = runvm_tests::artifact("RUNVM_INITRD", "agent initramfs").unwrap();
    b.edit(|c| {
        // The agent stops answering once the container runs (see the agent's test_stall).
        c["vm"] = serde_json::json!({"kernel": {
            "path": kernel, "initrd": initrd, "parameters": ["RUNVM_AGENT_TEST_FAULT=stall"]
        }});
        // A shape of its own that no other container uses: no template is made for it.
        c["annotations"]["run.oci.runvm.template"] = "false".into();
    });
    let out = r.join("stall1.out");
    let bundle_path = b.path().to_string_lossy().into_owned();
    ok(
        &runvm_to_files(r, &["create", "--bundle", &bundle_path, "stall1"], &out, T),
        "create",
    );
    ok(&runvm(r, &["start", "stall1"], T), "start");
    let pid = state_pid(r, "stall1");
    // Agent calls made for a command wait 10 s at most; the exec proxy's setup 60 s.
    let agent_bound = Duration::from_secs(30);
    assert!(
        !returns_within(r, &["ps", "stall1"], agent_bound),
        "ps answered"
    );
    returns_within(r, &["kill", "stall1", "TERM"], agent_bound);
    assert!(
        returns_within(r, &["pause", "stall1"], agent_bound),
        "pause"
    );
    assert!(
        returns_within(r, &["resume", "stall1"], agent_bound),
        "resume"
    );
    assert!(
        returns_within(r, &["state", "stall1"], agent_bound),
        "state"
    );
    let exec = ["exec", "stall1", "true"];
    assert!(
        !returns_within(r, &exec, Duration::from_secs(90)),
        "exec ran"
    );
    assert!(
        returns_within(r, &["delete", "--force", "stall1"], agent_bound),
        "delete"
    );
    assert!(!pid_alive(pid), "the VMM survived delete --force");
    assert!(!r.join("stall1").exists(), "state left");
}

/// The VMM of a `create` under way, killed once `ready` says so; `create` must fail in one
/// line and leave nothing.
fn kill_during_create(r: &Path, id: &str, b: &TestBundle, cgroup: &str, ready: impl FnOnce(&Path)) {
    let bundle_path = b.path().to_string_lossy().into_owned();
    let (rr, idc) = (r.to_path_buf(), id.to_string());
    let create =
        std::thread::spawn(move || runvm(&rr, &["create", "--bundle", &bundle_path, &idc], T));
    let vmm = first_member(cgroup);
    ready(&r.join(id));
    // The hook may have killed it already.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    );
    let f = create.join().unwrap();
    assert_ne!(f.code, Some(0), "create succeeded with its VMM killed");
    let err = f.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "one line expected:\n{err}");
    wait_dead(vmm, QUICK);
    assert_nothing_left(r, id, cgroup, vmm);
}

#[test]
fn a_vmm_killed_once_its_agent_is_ready_or_while_hooks_run_leaves_nothing() {
    skip_unless!(container_test_unavailable());
    let root = TempDir::new("root");
    let r = root.path();
    let _guard = ContainerGuard::new(r, &["ready1", "hook1"]);
    let kernel = runvm_tests::kernel().unwrap();
    let initrd = runvm_tests::artifact("RUNVM_INITRD", "agent initramfs").unwrap();

    // The agent is ready (the VMM removed its ready socket) but never answers `create`.
    let cgroup = format!("/runvm-test/{}", token());
    let mut b = bundle("fault-ready", &cgroup);
    b.edit(|c| {
        c["vm"] = serde_json::json!({"kernel": {
            "path": kernel, "initrd": initrd, "parameters": ["RUNVM_AGENT_TEST_FAULT=stall-create"]
        }});
        // A shape of its own that no other container uses: no template is made for it.
        c["annotations"]["run.oci.runvm.template"] = "false".into();
    });
    kill_during_create(r, "ready1", &b, &cgroup, |dir| {
        let ready = dir.join("v.sock_1025");
        let deadline = Instant::now() + T;
        while !ready.exists() {
            assert!(Instant::now() < deadline, "no ready socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        while ready.exists() {
            assert!(Instant::now() < deadline, "the agent never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    });

    // A prestart hook kills the VMM (its pid is in the state on the hook's stdin).
    let cgroup = format!("/runvm-test/{}", token());
    let mut b = bundle("fault-hook", &cgroup);
    let kill = r#"kill -9 $(sed -n 's/.*"pid":\([0-9]*\).*/\1/p')"#;
    b.edit(|c| {
        c["hooks"] =
            serde_json::json!({"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", kill]}]});
    });
    kill_during_create(r, "hook1", &b, &cgroup, |_| {});
    remove_test_parent();
}
