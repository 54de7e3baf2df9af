//! `runvm exec`: runs another process in a running container. This process is the
//! process's host-side proxy: it talks to the agent through the VM's vsock socket, relays
//! stdio (or a terminal) and catchable signals, and exits with the guest process's status.
//! With --detach a detached proxy is forked, its pid written to --pid-file, and `exec`
//! returns once the process started.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use agent_protocol::{ProcessSpec, Stdio, StreamKind, AGENT_PORT};
use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{SigSet, Signal};
use runtime_cli::agent_client::{AgentClient, ClientError, VsockDialer};
use runtime_cli::console;
use runtime_cli::container::Container;
use runtime_cli::state::{files, Status};
use runtime_cli::supervisor::FORWARDED;
use runtime_cli::translate::process_spec;

use crate::cli::{Cli, ExecArgs};

fn spec_from(a: &ExecArgs) -> anyhow::Result<ProcessSpec> {
    let mut spec = match &a.process {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let p: oci_spec::runtime::Process = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an OCI process", path.display()))?;
            process_spec(&p)
        }
        None => {
            if a.command.is_empty() {
                bail!("no command given: use --process FILE or COMMAND [ARGS...]");
            }
            ProcessSpec {
                args: a.command.clone(),
                env: vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ],
                cwd: "/".into(),
                ..Default::default()
            }
        }
    };
    spec.env.extend(a.env.iter().cloned());
    if let Some(cwd) = &a.cwd {
        spec.cwd = cwd.clone();
    }
    if let Some(u) = &a.user {
        let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
        spec.user.uid = uid
            .parse()
            .map_err(|_| anyhow!("invalid --user {u:?}: numeric uid[:gid] needed"))?;
        spec.user.gid = gid
            .parse()
            .map_err(|_| anyhow!("invalid --user {u:?}: numeric uid[:gid] needed"))?;
    }
    spec.user.additional_gids.extend(&a.additional_gids);
    if a.tty {
        spec.terminal = true;
    }
    if a.no_new_privs {
        spec.no_new_privileges = true;
    }
    if spec.args.is_empty() {
        bail!("the process has no arguments");
    }
    Ok(spec)
}

fn exec_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("exec-{}-{:x}", std::process::id(), t.as_nanos())
}

fn dup_std(fd: impl AsFd) -> std::io::Result<File> {
    Ok(File::from(fd.as_fd().try_clone_to_owned()?))
}

fn copy<R: Read, W: Write>(mut from: R, mut to: W) -> W {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.flush();
    to
}

/// This proxy's entry in the container's `execs/` directory while it runs: `ps --format
/// json` lists the host processes that make up the container.
struct ExecRegistration(Option<std::path::PathBuf>);

impl ExecRegistration {
    fn new(c: &Container) -> Self {
        let dir = c.dir.file(files::EXECS);
        let path = dir.join(std::process::id().to_string());
        let ok = std::fs::create_dir_all(&dir).is_ok() && File::create(&path).is_ok();
        ExecRegistration(ok.then_some(path))
    }
}

impl Drop for ExecRegistration {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Runs the process and relays it; returns its status. `started` is told once it runs.
fn proxy(
    c: &Container,
    a: &ExecArgs,
    spec: ProcessSpec,
    started: Option<OwnedFd>,
) -> anyhow::Result<i32> {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.thread_block()?;
    let client = AgentClient::new(Arc::new(VsockDialer {
        socket: c.dir.file(files::VSOCK),
        port: AGENT_PORT,
    }));
    let id = exec_id();
    let _registered = ExecRegistration::new(c);
    let mut control = client.control()?;
    let terminal = spec.terminal;
    let stdio = Stdio {
        stdin: !terminal,
        stdout: !terminal,
        stderr: !terminal,
    };
    control.create(&id, spec, stdio, false, None)?;
    let mut outputs = Vec::new();
    let mut tty: Option<File> = None;
    let mut saved_termios = None;
    if terminal {
        let stream = client.attach(&id, StreamKind::Terminal)?;
        let (input, output) = match &a.console_socket {
            Some(socket) => {
                let pty = console::open_pty()?;
                console::send_master(socket, &pty.master, &pty.name)?;
                let _ = nix::unistd::setsid();
                let _ = console::take_as_controlling(pty.slave.as_fd());
                tty = Some(pty.slave.try_clone()?);
                (pty.slave.try_clone()?, pty.slave)
            }
            None if std::io::stdin().is_terminal() => {
                saved_termios = Some(console::make_raw(std::io::stdin().as_fd())?);
                tty = Some(dup_std(std::io::stdin())?);
                (dup_std(std::io::stdin())?, dup_std(std::io::stdout())?)
            }
            None => bail!("--tty needs a --console-socket or a terminal on stdin"),
        };
        let to_guest = stream.try_clone()?;
        std::thread::spawn(move || copy(input, to_guest));
        outputs.push(std::thread::spawn(move || {
            copy(stream, output);
        }));
    } else {
        let s = client.attach(&id, StreamKind::Stdin)?;
        let input = dup_std(std::io::stdin())?;
        std::thread::spawn(move || {
            let s = copy(input, s);
            let _ = s.shutdown(std::net::Shutdown::Write);
        });
        for (kind, out) in [
            (StreamKind::Stdout, dup_std(std::io::stdout())?),
            (StreamKind::Stderr, dup_std(std::io::stderr())?),
        ] {
            let s = client.attach(&id, kind)?;
            outputs.push(std::thread::spawn(move || {
                copy(s, out);
            }));
        }
    }
    let pid = control.start(&id)?;
    log::debug!("exec {id}: guest pid {pid}");
    if let Some(fd) = started {
        let _ = File::from(fd).write_all(b"ok\n");
    }
    {
        let (client, id) = (client.clone(), id.clone());
        std::thread::spawn(move || loop {
            let Ok(sig) = set.wait() else { return };
            let r = match (sig, &tty) {
                (Signal::SIGWINCH, Some(t)) => match console::window_size(t.as_fd()) {
                    Some((rows, cols)) => {
                        client.control().and_then(|mut c| c.resize(&id, rows, cols))
                    }
                    None => Ok(()),
                },
                (Signal::SIGWINCH, None) => Ok(()),
                _ => client
                    .control()
                    .and_then(|mut c| c.signal(&id, sig as i32, false)),
            };
            if let Err(e) = r {
                log::debug!("forwarding {sig}: {e}");
            }
        });
    }
    let status = control.wait(&id);
    for t in outputs {
        let _ = t.join();
    }
    if let Some(saved) = &saved_termios {
        console::restore(std::io::stdin().as_fd(), saved);
    }
    Ok(status?)
}

pub fn run(cli: &Cli, a: &ExecArgs) -> anyhow::Result<i32> {
    let c = Container::load(&cli.root, &a.id)?;
    let status = c.status();
    if !matches!(status, Status::Running | Status::Created) {
        bail!("cannot exec in container {} in status {status}", a.id);
    }
    let spec = spec_from(a)?;
    if !a.detach {
        if let Some(p) = &a.pid_file {
            super::create::write_pid_file(p, std::process::id() as i32)?;
        }
        return match proxy(&c, a, spec, None) {
            Ok(s) => Ok(s),
            Err(e) => match e.downcast_ref::<ClientError>() {
                Some(ClientError::Exec { status, message }) => {
                    eprintln!("runvm: {message}");
                    Ok(*status)
                }
                _ => Err(e),
            },
        };
    }
    // Detached: a child process of its own session is the proxy.
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: this process is single-threaded here; the child only runs the proxy and exits.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            drop(r);
            let _ = nix::unistd::setsid();
            let code = match proxy(&c, a, spec, Some(w)) {
                Ok(s) => s,
                Err(e) => {
                    log::error!("exec in {}: {e:#}", a.id);
                    255
                }
            };
            std::process::exit(code);
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut report = String::new();
            let _ = File::from(r).read_to_string(&mut report);
            if report.trim() != "ok" {
                let _ = nix::sys::wait::waitpid(child, None);
                bail!("the process could not start in container {}", a.id);
            }
            if let Some(p) = &a.pid_file {
                super::create::write_pid_file(p, child.as_raw())?;
            }
            Ok(0)
        }
    }
}
