//! What config.json says about confinement, applied by the agent exactly, checked from
//! inside the container with a host-mode agent (as root): capability sets,
//! no_new_privileges and the seccomp profile (`/proc/self/status`), device node modes and
//! owners, sysctls, a read-only root with mount points created first, mount propagation
//! (`/proc/self/mountinfo`), a user namespace (`/proc/self/uid_map`, file owners on the
//! host), and each kind of bad input refused at create.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use agent_protocol::{Capabilities, ContainerSpec, Device, IdMapping, Mount, ProcessSpec};
use agent_protocol::{Seccomp, SeccompRule, UserNamespace};
use runtime_cli::agent_client::{start_process, ClientError, Launch};
use runtime_cli::relay::HostIo;
use runvm_tests::host_container::{bind, init, run, share, spec, unavailable, Out};
use runvm_tests::{skip_unless, Capture, HostAgent, TempDir};

/// Docker's default capability set (what `docker run` gives without --cap-add/--cap-drop).
const DOCKER_CAPS: [(&str, u32); 14] = [
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_RAW", 13),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_MKNOD", 27),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_SETFCAP", 31),
];

fn names(caps: &[(&str, u32)]) -> Vec<String> {
    caps.iter().map(|(n, _)| n.to_string()).collect()
}

fn mask(caps: &[(&str, u32)]) -> u64 {
    caps.iter().fold(0, |m, (_, bit)| m | 1 << bit)
}

/// A field of /proc/self/status as printed by the container.
fn status_field(out: &str, field: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in:\n{out}"))
        .trim()
        .to_string()
}

fn hex(out: &str, field: &str) -> u64 {
    u64::from_str_radix(&status_field(out, field), 16).unwrap()
}

/// Runs `script` with `sh -c` as the init of container `c`, with process spec `p`.
fn run_with(agent: &HostAgent, id: &str, c: ContainerSpec, p: ProcessSpec) -> Out {
    let client = agent.client();
    let mut control = client.control().unwrap();
    let (out, err) = (Capture::default(), Capture::default());
    let io = HostIo::Pipes {
        stdin: None,
        stdout: Some(Box::new(out.clone())),
        stderr: Some(Box::new(err.clone())),
    };
    let proc = start_process(&client, &mut control, id, p, io, init(c)).unwrap();
    let status = proc.finish(&mut control).unwrap();
    Out {
        status,
        out: out.text(),
        err: err.text(),
    }
}

#[test]
fn capabilities_no_new_privileges_and_seccomp_hold_in_the_process() {
    skip_unless!(unavailable());
    let dir = TempDir::new("fid-caps");
    let mut c = share(&dir);
    c.seccomp = Some(Seccomp {
        default_action: "SCMP_ACT_ALLOW".into(),
        architectures: vec!["SCMP_ARCH_X86_64".into()],
        syscalls: vec![SeccompRule {
            names: vec!["mkdir".into(), "mkdirat".into()],
            action: "SCMP_ACT_ERRNO".into(),
            errno_ret: Some(38),
            args: vec![],
        }],
        ..Default::default()
    });
    let mut p = spec(&[
        "sh",
        "-c",
        "cat /proc/self/status; mkdir /tmp/blocked 2>&1; echo mkdir=$?",
    ]);
    p.capabilities = Some(Capabilities {
        bounding: names(&DOCKER_CAPS),
        effective: names(&DOCKER_CAPS),
        permitted: names(&DOCKER_CAPS),
        ..Default::default()
    });
    p.no_new_privileges = true;
    let agent = HostAgent::start();
    let o = run_with(&agent, "caps-root", c, p);
    assert_eq!(o.status, 0, "{}", o.err);
    let want = mask(&DOCKER_CAPS);
    for field in ["CapBnd", "CapEff", "CapPrm"] {
        assert_eq!(hex(&o.out, field), want, "{field}:\n{}", o.out);
    }
    assert_eq!((hex(&o.out, "CapInh"), hex(&o.out, "CapAmb")), (0, 0));
    assert_eq!(status_field(&o.out, "NoNewPrivs"), "1");
    assert_eq!(status_field(&o.out, "Seccomp"), "2");
    assert!(o.out.contains("Function not implemented"), "{}", o.out);
    assert!(o.out.contains("mkdir=1"), "{}", o.out);
    assert!(!dir.path().join("rootfs/tmp/blocked").exists());

    // A user process keeps exactly one capability, through the ambient set.
    let dir = TempDir::new("fid-caps-user");
    let c = share(&dir);
    let mut p = spec(&["cat", "/proc/self/status"]);
    p.user.uid = 1000;
    p.user.gid = 1000;
    let one = [("CAP_NET_BIND_SERVICE", 10)];
    p.capabilities = Some(Capabilities {
        bounding: names(&[("CAP_CHOWN", 0), ("CAP_NET_BIND_SERVICE", 10)]),
        effective: names(&one),
        permitted: names(&one),
        inheritable: names(&one),
        ambient: names(&one),
    });
    // One container (init) per agent.
    let agent = HostAgent::start();
    let o = run_with(&agent, "caps-user", c, p);
    assert_eq!(o.status, 0, "{}", o.err);
    assert_eq!(hex(&o.out, "CapBnd"), 1 | 1 << 10, "{}", o.out);
    for field in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(hex(&o.out, field), 1 << 10, "{field}:\n{}", o.out);
    }
    assert_eq!(
        status_field(&o.out, "Uid").split_whitespace().next(),
        Some("1000")
    );
    assert_eq!(status_field(&o.out, "Seccomp"), "0");
}

#[test]
fn devices_sysctls_read_only_roots_and_propagation_follow_the_spec() {
    skip_unless!(unavailable());
    let host_msgmax = std::fs::read_to_string("/proc/sys/kernel/msgmax").unwrap();
    let dir = TempDir::new("fid-fs");
    let mut c = share(&dir);
    std::fs::create_dir_all(dir.path().join("mounts/0")).unwrap();
    std::fs::create_dir_all(dir.path().join("mounts/1")).unwrap();
    c.devices.push(Device {
        path: "/dev/testnode".into(),
        kind: "c".into(),
        major: 1,
        minor: 3,
        file_mode: Some(0o660),
        uid: Some(0),
        gid: Some(5),
    });
    c.sysctl = BTreeMap::from([("kernel.msgmax".to_string(), "12345".to_string())]);
    c.readonly = true;
    c.mounts.push(Mount {
        destination: "/scratch".into(),
        kind: "tmpfs".into(),
        source: "tmpfs".into(),
        options: vec![],
        share_source: false,
    });
    c.mounts
        .push(bind("mounts/0", "/shared", &["rbind", "rshared"]));
    c.mounts
        .push(bind("mounts/1", "/unbindable", &["rbind", "runbindable"]));
    c.rootfs_propagation = Some("shared".into());
    let script = "stat -c '%a %u %g %t:%T' /dev/testnode; cat /proc/sys/kernel/msgmax; \
                  touch /scratch/ok && echo scratch-ok; touch /rootfile 2>&1; \
                  cat /proc/self/mountinfo";
    let agent = HostAgent::start();
    let o = run(&agent, "fs", &["sh", "-c", script], init(c)).unwrap();
    assert_eq!(o.status, 0, "{}", o.err);
    let lines: Vec<&str> = o.out.lines().collect();
    assert_eq!(lines[0], "660 0 5 1:3", "device mode, owner, numbers");
    assert_eq!(lines[1], "12345", "sysctl");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/msgmax").unwrap(),
        host_msgmax,
        "the host's value stays"
    );
    assert_eq!(
        lines[2], "scratch-ok",
        "a mount point missing from the read-only root"
    );
    assert!(lines[3].contains("Read-only file system"), "{}", lines[3]);
    assert!(!dir.path().join("rootfs/rootfile").exists());
    let mountinfo = |point: &str| {
        lines
            .iter()
            .find(|l| l.split(' ').nth(4) == Some(point))
            .unwrap_or_else(|| panic!("no mount at {point}:\n{}", o.out))
            .to_string()
    };
    assert!(
        mountinfo("/shared").contains(" shared:"),
        "{}",
        mountinfo("/shared")
    );
    assert!(
        mountinfo("/unbindable").contains(" unbindable"),
        "{}",
        mountinfo("/unbindable")
    );
    assert!(mountinfo("/").contains(" shared:"), "{}", mountinfo("/"));
}

#[test]
fn a_user_namespace_maps_ids_for_the_init_and_for_joining_processes() {
    skip_unless!(unavailable());
    let dir = TempDir::new("fid-userns");
    let mut c = share(&dir);
    let map = vec![IdMapping {
        container_id: 0,
        host_id: 100_000,
        size: 65_536,
    }];
    c.user_namespace = Some(UserNamespace {
        uid_mappings: map.clone(),
        gid_mappings: map,
    });
    let agent = HostAgent::start();
    let client = agent.client();
    let mut control = client.control().unwrap();
    let out = Capture::default();
    let io = HostIo::Pipes {
        stdin: None,
        stdout: Some(Box::new(out.clone())),
        stderr: Some(Box::new(Capture::default())),
    };
    let script = "cat /proc/self/uid_map; id -u; touch /tmp/owned; sleep 30";
    let p = spec(&["sh", "-c", script]);
    let init_p = start_process(&client, &mut control, "userns", p, io, init(c)).unwrap();
    let owned = dir.path().join("rootfs/tmp/owned");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // The file can appear before the output written ahead of it has been relayed.
    while !owned.exists() || out.text().split_whitespace().count() < 4 {
        assert!(std::time::Instant::now() < deadline, "{}", out.text());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let text = out.text();
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(fields[..4], ["0", "100000", "65536", "0"], "{text}");
    assert_eq!(
        std::fs::metadata(&owned).unwrap().uid(),
        100_000,
        "owner on the host"
    );
    let joined = run(
        &agent,
        "joined",
        &["cat", "/proc/self/uid_map"],
        Launch::extra(),
    )
    .unwrap();
    assert_eq!(
        joined.out.split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"],
        "{}",
        joined.err
    );
    control.signal("userns", libc::SIGKILL, false).unwrap();
    assert_eq!(init_p.finish(&mut control).unwrap(), 128 + libc::SIGKILL);
}

fn create_error(agent: &HostAgent, id: &str, c: ContainerSpec, p: ProcessSpec) -> String {
    let client = agent.client();
    let mut control = client.control().unwrap();
    match control.create(id, p, Default::default(), true, Some(c)) {
        Err(ClientError::Exec { message, .. }) | Err(ClientError::Agent(message)) => message,
        other => panic!("{id}: create should fail, got {other:?}"),
    }
}

#[test]
fn bad_confinement_fails_at_create_with_a_clear_line() {
    skip_unless!(unavailable());
    let agent = HostAgent::start();
    type Breaker = Box<dyn Fn(&mut ContainerSpec, &mut ProcessSpec)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "cap",
            Box::new(|_, p| {
                p.capabilities = Some(Capabilities {
                    bounding: vec!["CAP_TELEPORT".into()],
                    ..Default::default()
                })
            }),
            "CAP_TELEPORT",
        ),
        (
            "sysctl",
            Box::new(|c, _| {
                c.sysctl = BTreeMap::from([("kernel.no_such_knob".into(), "1".into())]);
            }),
            "kernel.no_such_knob does not exist",
        ),
        (
            "syscall",
            Box::new(|c, _| {
                c.seccomp = Some(Seccomp {
                    default_action: "SCMP_ACT_ALLOW".into(),
                    syscalls: vec![SeccompRule {
                        names: vec!["teleport".into()],
                        action: "SCMP_ACT_ERRNO".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
            }),
            "unknown system call \"teleport\"",
        ),
        (
            "arch",
            Box::new(|c, _| {
                c.seccomp = Some(Seccomp {
                    default_action: "SCMP_ACT_ALLOW".into(),
                    architectures: vec!["SCMP_ARCH_PDP11".into()],
                    ..Default::default()
                })
            }),
            "SCMP_ARCH_PDP11",
        ),
        (
            "map",
            Box::new(|c, _| {
                let overlapping = vec![
                    IdMapping {
                        container_id: 0,
                        host_id: 100_000,
                        size: 10,
                    },
                    IdMapping {
                        container_id: 5,
                        host_id: 200_000,
                        size: 10,
                    },
                ];
                c.user_namespace = Some(UserNamespace {
                    uid_mappings: overlapping.clone(),
                    gid_mappings: overlapping,
                });
            }),
            "uid_map",
        ),
        (
            "propagation",
            Box::new(|c, _| c.rootfs_propagation = Some("sideways".into())),
            "not a mount propagation",
        ),
    ];
    for (id, breaker, needle) in cases {
        let dir = TempDir::new("fid-bad");
        let mut c = share(&dir);
        let mut p = spec(&["true"]);
        breaker(&mut c, &mut p);
        let message = create_error(&agent, id, c, p);
        assert!(message.contains(needle), "{id}: {message:?}");
        assert!(!message.contains('\n'), "{id}: one line");
    }
    // The agent serves on.
    let dir = TempDir::new("fid-after");
    let o = run(&agent, "after", &["true"], init(share(&dir))).unwrap();
    assert_eq!(o.status, 0);
}
