//! Docker and containerd run containers on runvm: real daemons started by the test on
//! private sockets and directories, runvm registered the way README.md documents (a
//! daemon.json `runtimes` entry with `runtimeArgs`; the runc shim's binary option), and the
//! user-visible behaviour of each command checked. Each engine is stopped by pid and its
//! files, mounts and shim sockets removed at the end, pass or fail.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use runvm_tests::clients::{clients_unavailable, Engine, IMAGE};
use runvm_tests::{ok, pid_alive, runvm_bin, skip_unless, Finished, TempDir};

/// Generous: VMs boot in tens of seconds on software KVM and several boot at once here.
const T: Duration = Duration::from_secs(400);
const QUICK: Duration = Duration::from_secs(60);

fn host_kernel() -> String {
    nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// Polls `f` until it yields Some, up to `timeout`.
fn eventually<V>(timeout: Duration, mut f: impl FnMut() -> Option<V>) -> Option<V> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} line in:\n{out}"))
}

/// One foreground run covering the options that shape the process and the VM.
fn foreground_options(d: &Engine) {
    let vol = TempDir::new("vol");
    let rw = vol.path().join("rw");
    let ro = vol.path().join("ro");
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&rw, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(rw.join("in"), "from-the-host").unwrap();
    std::fs::write(ro.join("keep"), "unchanged").unwrap();
    let rw_v = format!("{}:/data", rw.display());
    let ro_v = format!("{}:/ro:ro", ro.display());
    let script = "echo env=$FOO; echo pwd=$(pwd); echo id=$(id -u):$(id -g); echo host=$(hostname); \
                  echo in=$(cat /data/in); echo written > /data/out && echo wrote=yes; \
                  (echo x > /ro/keep) 2>/dev/null || echo ro=refused; \
                  echo mem=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo); echo kernel=$(uname -r)";
    let f = d.docker_cmd(
        &[
            "run",
            "--rm",
            "--runtime",
            "runvm",
            "-e",
            "FOO=bar",
            "-w",
            "/tmp",
            "-u",
            "1000:1000",
            "--hostname",
            "vmhost",
            "-v",
            &rw_v,
            "-v",
            &ro_v,
            "-m",
            "256m",
            IMAGE,
            "sh",
            "-c",
            script,
        ],
        T,
    );
    let out = &ok(&f, "docker run with options").stdout;
    assert_eq!(line(out, "env="), "bar");
    assert_eq!(line(out, "pwd="), "/tmp");
    assert_eq!(line(out, "id="), "1000:1000");
    assert_eq!(line(out, "host="), "vmhost");
    assert_eq!(line(out, "in="), "from-the-host");
    assert_eq!(line(out, "wrote="), "yes");
    assert_eq!(line(out, "ro="), "refused");
    // -m 256m is the guest's RAM (less what its kernel keeps for itself).
    let mem: u64 = line(out, "mem=").parse().unwrap();
    assert!(
        (200..=256).contains(&mem),
        "guest MemTotal {mem} MiB for -m 256m"
    );
    // Its own kernel: the container runs in a VM.
    assert_ne!(line(out, "kernel="), host_kernel());
    let out_meta = std::fs::metadata(rw.join("out")).unwrap();
    assert_eq!((out_meta.uid(), out_meta.gid()), (1000, 1000));
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "written\n"
    );
    assert_eq!(
        std::fs::read_to_string(ro.join("keep")).unwrap(),
        "unchanged"
    );
}

/// Docker's confinement holds in the guest: a read-only root with a tmpfs on a path the
/// image lacks, a capability set cut down to one, and Docker's default seccomp profile.
fn read_only_capabilities_and_seccomp(d: &Engine) {
    let script = "grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status; \
                  touch /newdir/ok && echo newdir=ok; \
                  touch /rootfile 2>/dev/null || echo root=read-only";
    let f = d.docker_cmd(
        &[
            "run",
            "--rm",
            "--runtime",
            "runvm",
            "--read-only",
            "--tmpfs",
            "/newdir",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_BIND_SERVICE",
            IMAGE,
            "sh",
            "-c",
            script,
        ],
        T,
    );
    let out = &ok(
        &f,
        "docker run --read-only --cap-drop ALL --cap-add NET_BIND_SERVICE",
    )
    .stdout;
    assert_eq!(line(out, "CapEff:").trim(), "0000000000000400", "{out}");
    assert_eq!(line(out, "CapBnd:").trim(), "0000000000000400", "{out}");
    assert_eq!(
        line(out, "Seccomp:").trim(),
        "2",
        "Docker's default profile: {out}"
    );
    assert_eq!(line(out, "newdir="), "ok");
    assert_eq!(line(out, "root="), "read-only");
}

fn exit_status_stdin_and_tty(d: &Engine) {
    let f = d.shell(
        &format!("echo piped-in | $DOCKER run --rm -i --runtime runvm {IMAGE} sh -c 'cat; exit 3'"),
        T,
    );
    assert_eq!(f.code, Some(3), "exit 3 with -i: {f:?}");
    assert_eq!(f.stdout.trim(), "piped-in");
    let f = d.docker_cmd(
        &["run", "--rm", "-t", "--runtime", "runvm", IMAGE, "tty"],
        T,
    );
    let out = &ok(&f, "docker run -t").stdout;
    assert!(out.trim().starts_with("/dev/pts/"), "tty printed {out:?}");
}

fn inspect(d: &Engine, name: &str, format: &str) -> String {
    let f = d.docker_cmd(&["inspect", "-f", format, name], QUICK);
    ok(&f, "docker inspect").stdout.trim().to_string()
}

fn logs_contain(d: &Engine, name: &str, text: &str) -> bool {
    eventually(T, || {
        let f = d.docker_cmd(&["logs", name], QUICK);
        f.stdout.contains(text).then_some(())
    })
    .is_some()
}

/// A detached container: logs, exec, exec -it, top, kill -s, pause/unpause, graceful stop.
fn detached_lifecycle(d: &Engine) {
    let script = "trap 'echo got-usr1' USR1; trap 'echo term-trapped; exit 0' TERM; echo started; \
                  while true; do sleep 1; done";
    let f = d.docker_cmd(
        &[
            "run",
            "-d",
            "--name",
            "main",
            "--runtime",
            "runvm",
            IMAGE,
            "sh",
            "-c",
            script,
        ],
        T,
    );
    ok(&f, "docker run -d");
    assert!(
        logs_contain(d, "main", "started"),
        "docker logs never showed the output"
    );
    let f = d.docker_cmd(
        &[
            "exec",
            "main",
            "sh",
            "-c",
            "echo exec-out; hostname; exit 4",
        ],
        T,
    );
    assert_eq!(f.code, Some(4), "docker exec status: {f:?}");
    assert!(f.stdout.starts_with("exec-out\n"), "{f:?}");
    let f = d.shell("script -qec \"$DOCKER exec -it main tty\" /dev/null", T);
    assert!(f.stdout.contains("/dev/pts/"), "docker exec -it: {f:?}");
    // top lists the host processes that are the container: its VMM.
    let pid = inspect(d, "main", "{{.State.Pid}}");
    let f = d.docker_cmd(&["top", "main"], QUICK);
    assert!(
        ok(&f, "docker top")
            .stdout
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1) == Some(pid.as_str())),
        "VMM pid {pid} not in docker top:\n{}",
        f.stdout
    );
    ok(
        &d.docker_cmd(&["kill", "-s", "USR1", "main"], QUICK),
        "docker kill -s USR1",
    );
    assert!(
        logs_contain(d, "main", "got-usr1"),
        "USR1 did not reach the trap"
    );
    ok(&d.docker_cmd(&["pause", "main"], QUICK), "docker pause");
    assert_eq!(inspect(d, "main", "{{.State.Status}}"), "paused");
    ok(&d.docker_cmd(&["unpause", "main"], QUICK), "docker unpause");
    assert_eq!(inspect(d, "main", "{{.State.Status}}"), "running");
    let t0 = Instant::now();
    ok(
        &d.docker_cmd(&["stop", "-t", "120", "main"], T),
        "docker stop",
    );
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "stop waited for the timeout"
    );
    assert_eq!(inspect(d, "main", "{{.State.ExitCode}}"), "0");
    assert!(logs_contain(d, "main", "term-trapped"));
    ok(&d.docker_cmd(&["rm", "main"], QUICK), "docker rm");
}

/// stop of a process that ignores SIGTERM, rm -f of a running container, run -d + wait.
fn stop_kill_rm_and_wait(d: &Engine) {
    let f = d.docker_cmd(
        &[
            "run",
            "-d",
            "--name",
            "stubborn",
            "--runtime",
            "runvm",
            IMAGE,
            "sh",
            "-c",
            "trap '' TERM; echo ready; while true; do sleep 1; done",
        ],
        T,
    );
    ok(&f, "docker run -d (ignores TERM)");
    assert!(logs_contain(d, "stubborn", "ready"));
    let t0 = Instant::now();
    ok(
        &d.docker_cmd(&["stop", "-t", "3", "stubborn"], T),
        "docker stop -t 3",
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "stopped before the grace period"
    );
    assert_eq!(inspect(d, "stubborn", "{{.State.ExitCode}}"), "137");
    ok(&d.docker_cmd(&["rm", "stubborn"], QUICK), "docker rm");

    ok(
        &d.docker_cmd(
            &[
                "run",
                "-d",
                "--name",
                "doomed",
                "--runtime",
                "runvm",
                IMAGE,
                "sleep",
                "1000",
            ],
            T,
        ),
        "docker run -d sleep",
    );
    let pid: i32 = inspect(d, "doomed", "{{.State.Pid}}").parse().unwrap();
    assert!(pid_alive(pid));
    ok(&d.docker_cmd(&["rm", "-f", "doomed"], T), "docker rm -f");
    assert!(
        eventually(QUICK, || (!pid_alive(pid)).then_some(())).is_some(),
        "the VMM {pid} outlived docker rm -f"
    );

    ok(
        &d.docker_cmd(
            &[
                "run",
                "-d",
                "--name",
                "five",
                "--runtime",
                "runvm",
                IMAGE,
                "sh",
                "-c",
                "sleep 2; exit 5",
            ],
            T,
        ),
        "docker run -d exit 5",
    );
    let f = d.docker_cmd(&["wait", "five"], T);
    assert_eq!(ok(&f, "docker wait").stdout.trim(), "5");
    ok(&d.docker_cmd(&["rm", "five"], QUICK), "docker rm");
}

/// What Docker shows when runvm cannot run the container: runvm's one-line error.
fn bad_input(d: &Engine) {
    let f = d.docker_cmd(
        &["run", "--rm", "--runtime", "runvm-nokernel", IMAGE, "true"],
        T,
    );
    assert_ne!(f.code, Some(0));
    assert!(
        f.stderr.contains("cannot read kernel /nonexistent/vmlinux"),
        "missing kernel: {}",
        f.stderr
    );
    let f = d.docker_cmd(
        &[
            "run",
            "--rm",
            "--runtime",
            "runvm",
            IMAGE,
            "/no/such/command",
        ],
        T,
    );
    assert_eq!(f.code, Some(127), "{f:?}");
    assert!(
        f.stderr.contains("/no/such/command: no such file"),
        "{}",
        f.stderr
    );
}

fn no_vmm_or_shim_left(e: &Engine) {
    let left = eventually(QUICK, || {
        let vmms: Vec<_> = e
            .leftover_processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("vmm-serve") || cmd.contains("containerd-shim"))
            .collect();
        vmms.is_empty().then_some(())
    });
    assert!(
        left.is_some(),
        "VMMs or shims still running: {:?}",
        e.leftover_processes()
    );
}

#[test]
fn docker_runs_containers_on_runvm() {
    skip_unless!(clients_unavailable());
    let d = Engine::docker().unwrap_or_else(|e| panic!("{e}"));
    // Two waves of three: each VM boot is CPU-bound on an emulated host, and more at once
    // on two cores would stretch a boot past the runtime's readiness deadline.
    std::thread::scope(|s| {
        s.spawn(|| foreground_options(&d));
        s.spawn(|| exit_status_stdin_and_tty(&d));
        s.spawn(|| detached_lifecycle(&d));
    });
    std::thread::scope(|s| {
        s.spawn(|| stop_kill_rm_and_wait(&d));
        s.spawn(|| bad_input(&d));
        s.spawn(|| read_only_capabilities_and_seccomp(&d));
    });
    let f = d.docker_cmd(&["ps", "-aq"], QUICK);
    assert_eq!(ok(&f, "docker ps").stdout.trim(), "", "containers left");
    no_vmm_or_shim_left(&d);
}

#[test]
fn containerd_runs_containers_on_runvm() {
    skip_unless!(clients_unavailable());
    let mut c = Engine::containerd().unwrap_or_else(|e| panic!("{e}"));
    // No registry: the image comes from a short-lived dockerd's `docker import` + `save`.
    let image = c.dir.path().join("image.tar");
    {
        let d = Engine::docker().unwrap_or_else(|e| panic!("{e}"));
        std::fs::copy(d.save_image().unwrap(), &image).unwrap();
    }
    let image_s = image.to_string_lossy().into_owned();
    ok(
        &c.ctr(&["images", "import", &image_s], T),
        "ctr images import",
    );
    let runvm = runvm_bin().unwrap().to_string_lossy().into_owned();
    let runc_root = c
        .dir
        .path()
        .join("runvm-root")
        .to_string_lossy()
        .into_owned();
    let fifo_dir = c.dir.path().join("fifo").to_string_lossy().into_owned();
    let reference = format!("docker.io/library/{IMAGE}:latest");
    // runvm finds its kernel and initramfs next to itself (`make` puts them there).
    let run = |c: &Engine, extra: &[&str], id: &str, cmd: &str| -> Finished {
        let mut args = vec![
            "run",
            "--runtime",
            "io.containerd.runc.v2",
            "--runc-binary",
            &runvm,
        ];
        args.extend(["--runc-root", &runc_root, "--fifo-dir", &fifo_dir]);
        args.extend(extra);
        args.extend([reference.as_str(), id, "sh", "-c", cmd]);
        c.ctr(&args, T)
    };

    let f = run(
        &c,
        &["-d"],
        "t2",
        "trap 'exit 9' USR1; while true; do sleep 1; done",
    );
    ok(&f, "ctr run -d");
    let f = c.ctr(
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "--fifo-dir",
            &fifo_dir,
            "t2",
            "sh",
            "-c",
            "echo exec-in-ctr; exit 2",
        ],
        T,
    );
    assert_eq!((f.code, f.stdout.trim()), (Some(2), "exec-in-ctr"), "{f:?}");
    // containerd dies mid-test: the task (its shim and VMM) lives on, and a new containerd
    // takes it over.
    c.kill_daemon();
    c.restart_containerd().unwrap();
    let f = c.ctr(&["task", "ls"], QUICK);
    assert!(
        ok(&f, "ctr task ls")
            .stdout
            .lines()
            .any(|l| l.starts_with("t2 ") && l.contains("RUNNING")),
        "{}",
        f.stdout
    );
    ok(
        &c.ctr(&["task", "kill", "-s", "SIGUSR1", "t2"], QUICK),
        "ctr task kill",
    );
    let stopped = eventually(T, || {
        let f = c.ctr(&["task", "ls"], QUICK);
        f.stdout
            .lines()
            .any(|l| l.starts_with("t2 ") && l.contains("STOPPED"))
            .then_some(())
    });
    assert!(stopped.is_some(), "t2 did not stop after SIGUSR1");
    let f = c.ctr(&["task", "delete", "t2"], QUICK);
    assert!(
        ok(&f, "ctr task delete").stderr.contains("exit code 9"),
        "{f:?}"
    );
    ok(
        &c.ctr(&["container", "delete", "t2"], QUICK),
        "ctr container delete",
    );

    let f = run(&c, &["--rm"], "t1", "echo from-ctr; uname -r; exit 6");
    assert_eq!(f.code, Some(6), "{f:?}");
    let mut lines = f.stdout.lines();
    assert_eq!(lines.next(), Some("from-ctr"));
    assert_ne!(lines.next().unwrap_or_default(), host_kernel());
    no_vmm_or_shim_left(&c);
}
