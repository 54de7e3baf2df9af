//! The agent in a real VM over virtio-vsock: `runvm vm-run` end to end (stdio separated,
//! stdin, exit status), and in one more VM: SIGTERM gives 143, a 32 MiB stdout stream
//! arrives intact, a missing program gives 127 while the agent keeps serving, and guest
//! processes keep their AVX registers across preemption (hardware KVM) or run with the
//! host profile's glibc setting that keeps glibc off them (software KVM, where the guest
//! kernel cannot preserve them).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_protocol::ProcessSpec;
use runtime_cli::agent_client::{start_process, AgentClient, ClientError, Launch};
use runtime_cli::relay::HostIo;
use runtime_cli::sandbox::Sandbox;
use runvm_tests::{
    agent_bin, agent_initramfs, busybox, kernel, runvm_bin, skip_unless, static_test_bin,
    vm_test_unavailable, Capture, PatternCheck, TempDir,
};
use vmm::{HostProfile, VmConfig};

const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the steps in one VM may take (a few minutes under software KVM).
const STEPS_TIMEOUT: Duration = Duration::from_secs(900);

fn unavailable() -> Option<String> {
    vm_test_unavailable()
        .or_else(|| agent_bin().err())
        .or_else(|| busybox().err())
        .or_else(|| static_test_bin("avx-check").err())
        .or_else(|| static_test_bin("pattern").err())
}

fn write_initrd(dir: &TempDir) -> std::path::PathBuf {
    let avx = static_test_bin("avx-check").unwrap();
    let pattern = static_test_bin("pattern").unwrap();
    let bytes = agent_initramfs(&[("bin/avx-check", &avx), ("bin/pattern", &pattern)]).unwrap();
    let p = dir.path().join("initrd.cpio");
    std::fs::write(&p, bytes).unwrap();
    p
}

fn spec(args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin:/sbin:/usr/bin:/usr/sbin".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}

#[test]
fn vm_run_separates_stdout_and_stderr_feeds_stdin_and_returns_the_status() {
    skip_unless!(unavailable());
    let dir = TempDir::new("vm-run");
    let initrd = write_initrd(&dir);
    let mut child = Command::new(runvm_bin().unwrap())
        .arg("--kernel")
        .arg(kernel().unwrap())
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "vm-run",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; read x; echo \"got $x\"; exit 7",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"hello from the host\n").unwrap();
    let mut out = String::new();
    let mut err = String::new();
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t = std::thread::spawn(move || {
        let mut e = String::new();
        se.read_to_string(&mut e).unwrap();
        e
    });
    so.read_to_string(&mut out).unwrap();
    err.push_str(&t.join().unwrap());
    let status = child.wait().unwrap();
    assert_eq!(out, "out\ngot hello from the host\n");
    assert_eq!(err, "err\n");
    assert_eq!(status.code(), Some(7));
}

#[test]
fn one_vm_signals_streams_failures_and_register_state() {
    skip_unless!(unavailable());
    let dir = TempDir::new("sandbox");
    let mut config = VmConfig::new(kernel().unwrap());
    config.initrd = Some(write_initrd(&dir));
    let sandbox = Sandbox::boot(config, dir.path(), READY_TIMEOUT).expect("booting the sandbox");
    let client = sandbox.client().clone();
    let steps = std::thread::spawn(move || exercise(client));
    // The steps wait on the agent; a VM that ends under them (or steps that outlast
    // their deadline) must fail the test at once, not leave it waiting. The VM ends
    // by itself once the last step shut its agent down: that is not a failure.
    let handle = sandbox.handle();
    let deadline = Instant::now() + STEPS_TIMEOUT;
    let mut ended_at: Option<Instant> = None;
    while !steps.is_finished() {
        if handle
            .wait_ended(Some(Duration::from_millis(200)))
            .is_some()
        {
            ended_at.get_or_insert_with(Instant::now);
            std::thread::sleep(Duration::from_millis(200));
        }
        let vm_gone = ended_at.is_some_and(|t| t.elapsed() > Duration::from_secs(10));
        if vm_gone || Instant::now() > deadline {
            handle.stop();
            let exit = sandbox.finish(Duration::from_secs(5));
            let why = if vm_gone {
                "the VM ended under them"
            } else {
                "deadline"
            };
            panic!("the steps did not finish ({why}, {STEPS_TIMEOUT:?}): the VM's end: {exit}");
        }
    }
    if let Err(panic) = steps.join() {
        let _ = sandbox.finish(Duration::ZERO);
        std::panic::resume_unwind(panic);
    }
    let exit = sandbox.finish(Duration::from_secs(30));
    assert!(exit.is_clean(), "{exit}");
}

/// Signals, a long stream, a missing program and AVX state, through one agent; ends by
/// shutting the agent down.
fn exercise(client: AgentClient) {
    let mut control = client.control().unwrap();
    let capture = |id: &str, args: &[&str], control: &mut runtime_cli::agent_client::Control| {
        let out = Capture::default();
        let stdio = HostIo::Pipes {
            stdin: None,
            stdout: Some(Box::new(out.clone())),
            stderr: Some(Box::new(Capture::default())),
        };
        let p = start_process(&client, control, id, spec(args), stdio, Launch::extra()).unwrap();
        (p, out)
    };

    // SIGTERM from the host: 128 + 15.
    let (p, _) = capture("sleeper", &["sleep", "1000"], &mut control);
    client
        .control()
        .unwrap()
        .signal("sleeper", libc::SIGTERM, false)
        .unwrap();
    assert_eq!(p.finish(&mut control).unwrap(), 143);

    // 32 MiB of stdout, checked byte by byte as it arrives.
    let check = PatternCheck::default();
    let stdio = HostIo::Pipes {
        stdin: None,
        stdout: Some(Box::new(check.clone())),
        stderr: Some(Box::new(Capture::default())),
    };
    let p = start_process(
        &client,
        &mut control,
        "stream",
        spec(&["pattern", "33554432"]),
        stdio,
        Launch::extra(),
    )
    .unwrap();
    assert_eq!(p.finish(&mut control).unwrap(), 0);
    assert_eq!(
        check.result(),
        (32 << 20, None),
        "(bytes, first wrong byte) of the stream"
    );

    // A missing program: 127, and the agent still serves.
    let stdio = HostIo::Pipes {
        stdin: None,
        stdout: None,
        stderr: None,
    };
    match start_process(
        &client,
        &mut control,
        "missing",
        spec(&["no-such-program"]),
        stdio,
        Launch::extra(),
    ) {
        Err(ClientError::Exec { status, .. }) => assert_eq!(status, 127),
        other => panic!("expected exec failure, got {other:?}"),
    }

    // AVX registers across preemption.
    let profile = HostProfile::detect();
    match profile.guest_env() {
        None => {
            // Hardware KVM: the guest kernel preserves them.
            let (p1, o1) = capture("avx1", &["avx-check", "1"], &mut control);
            let mut c2 = client.control().unwrap();
            let (p2, o2) = capture("avx2", &["avx-check", "2"], &mut c2);
            assert_eq!(p1.finish(&mut control).unwrap(), 0);
            assert_eq!(p2.finish(&mut c2).unwrap(), 0);
            for o in [o1.text(), o2.text()] {
                assert!(
                    o.starts_with("avx-check: unavailable")
                        || o == "avx-check: corrupted lanes 0\n",
                    "guest user space lost AVX register state: {o}"
                );
            }
        }
        Some(var) => {
            // Software KVM: every guest process gets the glibc setting.
            let (p, out) = capture(
                "env",
                &["sh", "-c", "echo \"GLIBC_TUNABLES=$GLIBC_TUNABLES\""],
                &mut control,
            );
            assert_eq!(p.finish(&mut control).unwrap(), 0);
            assert_eq!(out.text(), format!("{var}\n"));
        }
    }

    control.shutdown().unwrap();
}
