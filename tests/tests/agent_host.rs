//! The guest agent as a host process (`runvm-agent --listen unix:PATH`) driven by runvm's
//! agent client: process setup, stdio, signals, terminals, exit statuses and bad input,
//! without a VM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use agent_protocol::{
    read_frame, write_frame, ConsoleSize, ProcessSpec, Response, StreamKind, User,
};
use runtime_cli::agent_client::{start_process, ClientError, Launch};
use runtime_cli::relay::HostIo;
use runvm_tests::{agent_bin, skip_unless, Capture, HostAgent};

fn spec(args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}

struct Run {
    status: i32,
    out: String,
    err: String,
}

fn run(
    agent: &HostAgent,
    id: &str,
    spec: ProcessSpec,
    stdin: Option<&[u8]>,
) -> Result<Run, ClientError> {
    let client = agent.client();
    let mut control = client.control()?;
    let (out, err) = (Capture::default(), Capture::default());
    let stdio = HostIo::Pipes {
        stdin: stdin.map(|b| Box::new(std::io::Cursor::new(b.to_vec())) as Box<dyn Read + Send>),
        stdout: Some(Box::new(out.clone())),
        stderr: Some(Box::new(err.clone())),
    };
    let p = start_process(&client, &mut control, id, spec, stdio, Launch::extra())?;
    let status = p.finish(&mut control)?;
    Ok(Run {
        status,
        out: out.text(),
        err: err.text(),
    })
}

#[test]
fn stdout_stderr_stdin_and_exit_code() {
    skip_unless!(agent_bin().err());
    let agent = HostAgent::start();
    let r = run(
        &agent,
        "p1",
        spec(&[
            "sh",
            "-c",
            "echo out; echo err >&2; read x; echo \"got $x\"; exit 7",
        ]),
        Some(b"hello\n"),
    )
    .unwrap();
    assert_eq!(
        (r.status, r.out.as_str(), r.err.as_str()),
        (7, "out\ngot hello\n", "err\n")
    );
}

#[test]
fn signals_give_128_plus_the_signal() {
    skip_unless!(agent_bin().err());
    let agent = HostAgent::start();
    let client = agent.client();
    let mut control = client.control().unwrap();
    for (id, sig) in [("term", libc::SIGTERM), ("kill", libc::SIGKILL)] {
        let stdio = HostIo::Pipes {
            stdin: None,
            stdout: Some(Box::new(Capture::default())),
            stderr: None,
        };
        let p = start_process(
            &client,
            &mut control,
            id,
            spec(&["sleep", "100"]),
            stdio,
            Launch::extra(),
        )
        .unwrap();
        assert!(control.pids().unwrap().contains(&p.pid));
        let mut other = client.control().unwrap();
        other.signal(id, sig, false).unwrap();
        assert_eq!(p.finish(&mut control).unwrap(), 128 + sig);
    }
    // Signalling an exited process is an error, not a crash.
    assert!(control.signal("term", libc::SIGTERM, false).is_err());
    assert!(control.pids().unwrap().is_empty());
}

#[test]
fn a_signal_to_all_reaches_the_whole_process_group() {
    skip_unless!(agent_bin().err());
    let agent = HostAgent::start();
    let client = agent.client();
    let mut control = client.control().unwrap();
    let out = Capture::default();
    let stdio = HostIo::Pipes {
        stdin: None,
        stdout: Some(Box::new(out.clone())),
        stderr: None,
    };
    // The background sleep holds stdout open: only a group-wide signal ends the output.
    let p = start_process(
        &client,
        &mut control,
        "grp",
        spec(&["sh", "-c", "sleep 100 & echo started; wait"]),
        stdio,
        Launch::extra(),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !out.text().contains("started") {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    client
        .control()
        .unwrap()
        .signal("grp", libc::SIGKILL, true)
        .unwrap();
    assert_eq!(p.finish(&mut control).unwrap(), 137);
}

#[test]
fn missing_and_unexecutable_programs_fail_with_127_and_126() {
    skip_unless!(agent_bin().err());
    let agent = HostAgent::start();
    match run(&agent, "missing", spec(&["no-such-program-anywhere"]), None) {
        Err(ClientError::Exec {
            status: 127,
            message,
        }) => assert!(message.contains("not found"), "{message}"),
        other => panic!(
            "expected exec failure 127, got {:?}",
            other.map(|r| r.status)
        ),
    }
    let dir = runvm_tests::TempDir::new("notexec");
    let file = dir.path().join("data.txt");
    std::fs::write(&file, "not a program\n").unwrap();
    match run(&agent, "notexec", spec(&[file.to_str().unwrap()]), None) {
        Err(ClientError::Exec { status: 126, .. }) => {}
        other => panic!(
            "expected exec failure 126, got {:?}",
            other.map(|r| r.status)
        ),
    }
    let mut s = spec(&["true"]);
    s.cwd = "/no/such/dir".into();
    assert!(matches!(
        run(&agent, "badcwd", s, None),
        Err(ClientError::Exec { .. })
    ));
    // The agent keeps serving.
    assert_eq!(
        run(&agent, "after", spec(&["true"]), None).unwrap().status,
        0
    );
}

#[test]
fn user_groups_cwd_env_and_umask_are_applied() {
    skip_unless!(agent_bin().err());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        runvm_tests::record_skip(module_path!(), "changing user needs root");
        return;
    }
    let agent = HostAgent::start();
    let mut s = spec(&["sh", "-c", "id -u; id -g; id -G; pwd; echo \"$FOO\"; umask"]);
    s.user = User {
        uid: 1000,
        gid: 1000,
        umask: Some(0o027),
        additional_gids: vec![1001, 1002],
    };
    s.cwd = "/tmp".into();
    s.env.push("FOO=bar baz".into());
    let r = run(&agent, "user", s, None).unwrap();
    assert_eq!(r.status, 0, "stderr: {}", r.err);
    assert_eq!(r.out, "1000\n1000\n1000 1001 1002\n/tmp\nbar baz\n0027\n");
}

#[test]
fn a_terminal_is_allocated_and_resized() {
    skip_unless!(agent_bin().err());
    let agent = HostAgent::start();
    let client = agent.client();
    let mut control = client.control().unwrap();
    let mut s = spec(&["sh", "-c", "tty; stty size; read x; stty size"]);
    s.terminal = true;
    s.console_size = Some(ConsoleSize {
        height: 24,
        width: 80,
    });
    control
        .create("tty", s, Default::default(), false, None)
        .unwrap();
    let mut term = client.attach("tty", StreamKind::Terminal).unwrap();
    control.start("tty").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    term.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    while !String::from_utf8_lossy(&seen).contains("24 80") {
        let n = term.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "terminal closed early: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&seen).contains("/dev/pts/"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    client.control().unwrap().resize("tty", 30, 100).unwrap();
    term.write_all(b"go\n").unwrap();
    let mut rest = Vec::new();
    let _ = term.read_to_end(&mut rest);
    assert!(
        String::from_utf8_lossy(&rest).contains("30 100"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(control.wait("tty").unwrap(), 0);
}

#[test]
fn output_is_complete_before_the_status_arrives() {
    skip_unless!(agent_bin().err());
    let agent = HostAgent::start();
    // 32 MiB of stdout, then an immediate exit.
    let r = run(
        &agent,
        "big",
        spec(&[
            "sh",
            "-c",
            "head -c 33554432 /dev/zero | tr '\\0' x; exit 3",
        ]),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 3);
    assert_eq!(r.out.len(), 32 << 20);
    assert!(r.out.bytes().all(|b| b == b'x'));
}

#[test]
fn stdin_round_trips_through_cat() {
    skip_unless!(agent_bin().err());
    let agent = HostAgent::start();
    let input: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let client = agent.client();
    let mut control = client.control().unwrap();
    let out = Capture::default();
    let stdio = HostIo::Pipes {
        stdin: Some(Box::new(std::io::Cursor::new(input.clone()))),
        stdout: Some(Box::new(out.clone())),
        stderr: None,
    };
    let p = start_process(
        &client,
        &mut control,
        "cat",
        spec(&["cat"]),
        stdio,
        Launch::extra(),
    )
    .unwrap();
    assert_eq!(p.finish(&mut control).unwrap(), 0);
    assert!(out.bytes() == input, "cat's output differs from its input");
}

#[test]
fn a_host_that_hangs_up_mid_stream_does_not_hurt_the_agent() {
    skip_unless!(agent_bin().err());
    let mut agent = HostAgent::start();
    let client = agent.client();
    let mut control = client.control().unwrap();
    control
        .create(
            "yes",
            spec(&["yes"]),
            agent_protocol::Stdio {
                stdin: false,
                stdout: true,
                stderr: false,
            },
            false,
            None,
        )
        .unwrap();
    let mut out = client.attach("yes", StreamKind::Stdout).unwrap();
    control.start("yes").unwrap();
    let mut buf = [0u8; 4096];
    out.read_exact(&mut buf).unwrap();
    drop(out);
    // `yes` dies of SIGPIPE once the agent's copy fails.
    assert_eq!(control.wait("yes").unwrap(), 128 + libc::SIGPIPE);
    assert!(agent.alive());
    assert_eq!(
        run(&agent, "after", spec(&["true"]), None).unwrap().status,
        0
    );
}

#[test]
fn garbage_and_bad_versions_are_answered_and_survived() {
    skip_unless!(agent_bin().err());
    let mut agent = HostAgent::start();
    let raw = || UnixStream::connect(agent.socket()).unwrap();
    let answer = |s: &mut UnixStream| -> Response {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        read_frame(s).unwrap()
    };
    // Not JSON.
    let mut s = raw();
    s.write_all(&5u32.to_be_bytes()).unwrap();
    s.write_all(b"hello").unwrap();
    assert!(matches!(answer(&mut s), Response::Error { .. }));
    // Oversized length.
    let mut s = raw();
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(matches!(answer(&mut s), Response::Error { message } if message.contains("larger")));
    // Unknown version.
    let mut s = raw();
    write_frame(&mut s, &agent_protocol::Hello::Control { version: 99 }).unwrap();
    assert!(matches!(answer(&mut s), Response::Error { message } if message.contains("99")));
    // Truncated frame, then hang-up.
    let mut s = raw();
    s.write_all(&[0, 0, 1]).unwrap();
    drop(s);
    // A valid control connection with a malformed request keeps working.
    let mut s = raw();
    write_frame(
        &mut s,
        &agent_protocol::Hello::Control {
            version: agent_protocol::PROTOCOL_VERSION,
        },
    )
    .unwrap();
    assert!(matches!(answer(&mut s), Response::Welcome { .. }));
    write_frame(&mut s, &serde_json::json!({"op": "reformat"})).unwrap();
    assert!(matches!(answer(&mut s), Response::Error { .. }));
    write_frame(&mut s, &agent_protocol::Request::Pids).unwrap();
    assert!(matches!(answer(&mut s), Response::Pids { .. }));
    // Streams for processes that do not exist are refused.
    let mut st = agent.client().attach("ghost", StreamKind::Stdout).unwrap();
    assert!(matches!(answer(&mut st), Response::Error { .. }));
    assert!(agent.alive());
    assert_eq!(run(&agent, "ok", spec(&["true"]), None).unwrap().status, 0);
}
