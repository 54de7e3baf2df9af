//! The agent's container setup, run by a host-mode agent (as root, in namespaces it
//! creates): the init process in its own PID, mount and UTS namespaces and root; OCI
//! mounts, bind mounts from the share (read-only enforced), masked and read-only paths;
//! processes joining the container; terminals from the container's devpts; mount
//! destinations that try to leave the root; and bad input.

use std::path::Path;
use std::time::Duration;

use agent_protocol::{ContainerSpec, Mount, StreamKind};
use runtime_cli::agent_client::{start_process, ClientError, Launch};
use runtime_cli::relay::HostIo;
use runvm_tests::host_container::{bind, init, run, share, spec, unavailable};
use runvm_tests::{skip_unless, token, Capture, HostAgent, TempDir};

#[test]
fn the_init_process_gets_its_own_root_namespaces_and_mounts() {
    skip_unless!(unavailable());
    let dir = TempDir::new("ctr-init");
    let mut c = share(&dir);
    let secret = token();
    std::fs::write(dir.path().join("mounts/0"), &secret).unwrap();
    std::fs::create_dir_all(dir.path().join("mounts/1")).unwrap();
    std::fs::write(dir.path().join("mounts/1/kept"), "kept\n").unwrap();
    c.hostname = Some("ctr-test".into());
    std::fs::write(dir.path().join("rootfs/etc/masked-file"), "visible\n").unwrap();
    std::fs::create_dir_all(dir.path().join("rootfs/masked-dir")).unwrap();
    std::fs::write(dir.path().join("rootfs/masked-dir/inside"), "visible\n").unwrap();
    c.masked_paths.push("/etc/masked-file".into());
    c.masked_paths.push("/masked-dir".into());
    c.mounts
        .push(bind("mounts/0", "/data/in.txt", &["rbind", "ro"]));
    c.mounts
        .push(bind("mounts/1", "/ro", &["rbind", "ro", "nosuid", "nodev"]));
    let agent = HostAgent::start();
    let script = "echo pid=$$; hostname; ls /; cat /data/in.txt; echo; \
                  touch /ro/x 2>/dev/null && echo ro-writable || echo ro-refused; \
                  echo written > /root/new.txt; echo null > /dev/null && echo null-ok; \
                  echo masked=$(cat /etc/masked-file)$(ls /masked-dir); \
                  echo 1 > /proc/sys/kernel/hostname 2>/dev/null && echo procsys-writable || echo procsys-refused";
    let o = run(&agent, "init", &["sh", "-c", script], init(c)).unwrap();
    assert_eq!(o.status, 0, "stderr: {}", o.err);
    let lines: Vec<&str> = o.out.lines().collect();
    assert_eq!(lines[0], "pid=1");
    assert_eq!(lines[1], "ctr-test");
    assert!(
        o.out.contains("\nbin\n") && o.out.contains("\nproc\n"),
        "{}",
        o.out
    );
    assert!(
        !o.out.contains("\nwork\n"),
        "the host root leaked in: {}",
        o.out
    );
    assert!(o.out.contains(&secret), "{}", o.out);
    assert!(o.out.contains("ro-refused"), "{}", o.out);
    assert!(o.out.contains("null-ok"), "{}", o.out);
    assert!(o.out.contains("procsys-refused"), "{}", o.out);
    assert!(
        o.out.lines().any(|l| l == "masked="),
        "masked paths show: {}",
        o.out
    );
    // What the container wrote is in the rootfs on the host; the read-only bind is intact.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("rootfs/root/new.txt")).unwrap(),
        "written\n"
    );
    assert!(!dir.path().join("mounts/1/x").exists());
}

#[test]
fn later_processes_join_the_container() {
    skip_unless!(unavailable());
    let dir = TempDir::new("ctr-exec");
    let mut c = share(&dir);
    c.hostname = Some("joined".into());
    let agent = HostAgent::start();
    let client = agent.client();
    let mut control = client.control().unwrap();
    let stdio = HostIo::Pipes {
        stdin: None,
        stdout: Some(Box::new(Capture::default())),
        stderr: None,
    };
    let init_p = start_process(
        &client,
        &mut control,
        "init",
        spec(&["sleep", "1000"]),
        stdio,
        init(c),
    )
    .unwrap();
    let o = run(
        &agent,
        "exec1",
        &["sh", "-c", "echo pid=$$; hostname; cat /proc/1/comm; ls /"],
        Launch::extra(),
    )
    .unwrap();
    assert_eq!(o.status, 0, "{}", o.err);
    let lines: Vec<&str> = o.out.lines().collect();
    assert_ne!(lines[0], "pid=1");
    assert_eq!(lines[1], "joined");
    assert_eq!(lines[2], "sleep");
    assert!(o.out.contains("\nbin\n"), "{}", o.out);
    // PID 1 of a namespace ignores SIGTERM without a handler (as under runc); SIGKILL ends
    // it, and with it the whole container.
    client
        .control()
        .unwrap()
        .signal("init", libc::SIGKILL, false)
        .unwrap();
    assert_eq!(init_p.finish(&mut control).unwrap(), 137);
}

#[test]
fn a_terminal_comes_from_the_containers_devpts() {
    skip_unless!(unavailable());
    let dir = TempDir::new("ctr-tty");
    let c = share(&dir);
    let agent = HostAgent::start();
    let client = agent.client();
    let mut control = client.control().unwrap();
    let mut s = spec(&["sh", "-c", "tty; test -t 0 && echo interactive"]);
    s.terminal = true;
    control
        .create("tty", s, Default::default(), true, Some(c))
        .unwrap();
    let mut term = client.attach("tty", StreamKind::Terminal).unwrap();
    control.start("tty").unwrap();
    let mut out = Vec::new();
    term.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = std::io::Read::read_to_end(&mut term, &mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("/dev/pts/0"), "{out:?}");
    assert!(out.contains("interactive"), "{out:?}");
    assert_eq!(control.wait("tty").unwrap(), 0);
}

#[test]
fn mount_destinations_cannot_leave_the_root() {
    skip_unless!(unavailable());
    let dir = TempDir::new("ctr-escape");
    let mut c = share(&dir);
    let outside = std::env::temp_dir().join(format!("runvm-escape-{}", token()));
    // Symlinks in the image that point out of the root, absolutely and relatively.
    std::os::unix::fs::symlink(&outside, dir.path().join("rootfs/abs")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../tmp", dir.path().join("rootfs/rel"))
        .unwrap();
    let name = outside.file_name().unwrap().to_string_lossy().into_owned();
    c.mounts.push(Mount {
        destination: "/abs/inner".into(),
        kind: "tmpfs".into(),
        source: "tmpfs".into(),
        options: vec![],
        share_source: false,
    });
    c.mounts.push(Mount {
        destination: format!("/rel/{name}-rel"),
        kind: "tmpfs".into(),
        source: "tmpfs".into(),
        options: vec![],
        share_source: false,
    });
    c.mounts.push(Mount {
        destination: format!("/../../../tmp/{name}-dots"),
        kind: "tmpfs".into(),
        source: "tmpfs".into(),
        options: vec![],
        share_source: false,
    });
    let agent = HostAgent::start();
    let o = run(&agent, "esc", &["true"], init(c)).unwrap();
    assert_eq!(o.status, 0, "{}", o.err);
    for host_path in [
        outside.clone(),
        Path::new("/tmp").join(format!("{name}-rel")),
        Path::new("/tmp").join(format!("{name}-dots")),
    ] {
        assert!(
            !host_path.exists(),
            "a mount destination escaped to {}",
            host_path.display()
        );
    }
    // They landed inside the root instead.
    assert!(dir.path().join(format!("rootfs/tmp/{name}-dots")).exists());
}

#[test]
fn bad_container_input_fails_at_create_and_leaves_nothing() {
    skip_unless!(unavailable());
    let agent = HostAgent::start();
    type Breaker = Box<dyn Fn(&mut ContainerSpec)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "norootfs",
            Box::new(|c: &mut ContainerSpec| c.rootfs = "missing".into()),
            "rootfs",
        ),
        (
            "badtype",
            Box::new(|c: &mut ContainerSpec| {
                c.mounts.push(Mount {
                    destination: "/x".into(),
                    kind: "nosuchfs".into(),
                    source: "none".into(),
                    options: vec![],
                    share_source: false,
                })
            }),
            "nosuchfs",
        ),
        (
            "nosource",
            Box::new(|c: &mut ContainerSpec| c.mounts.push(bind("mounts/9", "/y", &["rbind"]))),
            "mounts/9",
        ),
        (
            "relative",
            Box::new(|c: &mut ContainerSpec| {
                c.mounts.push(Mount {
                    destination: "relative/path".into(),
                    kind: "tmpfs".into(),
                    source: "tmpfs".into(),
                    options: vec![],
                    share_source: false,
                })
            }),
            "not absolute",
        ),
    ];
    for (id, break_it, needle) in cases {
        let dir = TempDir::new("ctr-bad");
        let mut c = share(&dir);
        break_it(&mut c);
        match run(&agent, id, &["true"], init(c)) {
            Err(ClientError::Exec { message, .. }) | Err(ClientError::Agent(message)) => {
                assert!(message.contains(needle), "{id}: {message}")
            }
            Err(e) => panic!("{id}: unexpected error {e}"),
            Ok(o) => panic!("{id}: the container started (status {})", o.status),
        }
        let pids = agent.client().control().unwrap().pids().unwrap();
        assert!(pids.is_empty(), "{id}: processes left: {pids:?}");
    }
}
