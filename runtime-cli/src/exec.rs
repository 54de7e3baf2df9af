//! `exec`: another process in a running container. The calling process is the process's
//! host-side proxy: it drives the agent through the VM's vsock socket, relays stdio (or a
//! terminal) and catchable signals, and exits with the guest process's status. Detached,
//! a proxy is forked into a session of its own, its pid goes to the pid file, and `exec`
//! returns once the process started.

use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agent_protocol::{ProcessSpec, AGENT_PORT};
use nix::sys::signal::Signal;

use crate::agent_client::{AgentClient, ClientError, VsockDialer};
use crate::console;
use crate::container::Container;
use crate::lifecycle::{write_pid_file, Globals, LifecycleError};
use crate::ready::{ReadyReader, ReadyWriter};
use crate::relay::{self, HostIo, Relay};
use crate::state::{files, Status};
use crate::supervisor::AGENT_CALL_TIMEOUT;
use crate::translate::process_spec;

/// `exec`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ExecOptions {
    /// process.json describing the process.
    #[arg(long, short = 'p')]
    pub process: Option<PathBuf>,
    /// Return once the process started.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Write the process's pid (its host-side proxy) here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Allocate a terminal.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Unix socket that receives the terminal's master.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Environment variable (KEY=VALUE), repeatable.
    #[arg(long, short = 'e')]
    pub env: Vec<String>,
    /// Working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// User as uid[:gid].
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Additional group ids, repeatable.
    #[arg(long = "additional-gids", short = 'g')]
    pub additional_gids: Vec<u32>,
    /// Set no_new_privileges.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Accepted for runc compatibility.
    #[arg(long, hide = true)]
    pub cap: Vec<String>,
    /// Accepted for runc compatibility.
    #[arg(long, default_value_t = 0, hide = true)]
    pub preserve_fds: u32,
    /// Accepted for runc compatibility.
    #[arg(long, hide = true)]
    pub process_label: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long, hide = true)]
    pub apparmor: Option<String>,
    /// Container id.
    pub id: String,
    /// Command and arguments (when --process is not given).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

fn invalid(message: String) -> LifecycleError {
    LifecycleError::Invalid(message)
}

/// The process to run: `--process`, or the command line, with the flags applied.
fn spec_from(a: &ExecOptions) -> Result<ProcessSpec, LifecycleError> {
    let mut spec = match &a.process {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(format!("reading {}: {e}", path.display())))?;
            let p: oci_spec::runtime::Process = serde_json::from_str(&text)
                .map_err(|e| invalid(format!("{} is not an OCI process: {e}", path.display())))?;
            process_spec(&p)
        }
        None if a.command.is_empty() => {
            return Err(invalid(
                "no command given: use --process FILE or COMMAND [ARGS...]".into(),
            ))
        }
        None => ProcessSpec {
            args: a.command.clone(),
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cwd: "/".into(),
            ..Default::default()
        },
    };
    spec.env.extend(a.env.iter().cloned());
    if let Some(cwd) = &a.cwd {
        spec.cwd = cwd.clone();
    }
    if let Some(u) = &a.user {
        let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
        let bad = || invalid(format!("invalid --user {u:?}: numeric uid[:gid] needed"));
        spec.user.uid = uid.parse().map_err(|_| bad())?;
        spec.user.gid = gid.parse().map_err(|_| bad())?;
    }
    spec.user.additional_gids.extend(&a.additional_gids);
    spec.terminal |= a.tty;
    spec.no_new_privileges |= a.no_new_privs;
    if spec.args.is_empty() {
        return Err(invalid("the process has no arguments".into()));
    }
    Ok(spec)
}

fn exec_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("exec-{}-{:x}", std::process::id(), t.as_nanos())
}

/// This proxy's entry in the container's `execs/` directory while it runs: `ps --format
/// json` lists the host processes that make up the container.
struct ExecRegistration(Option<PathBuf>);

impl ExecRegistration {
    fn new(c: &Container) -> Self {
        let dir = c.dir.file(files::EXECS);
        let path = dir.join(std::process::id().to_string());
        use std::os::unix::fs::DirBuilderExt;
        let made = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        let dir_ok = made.is_ok() || dir.is_dir();
        let ok = dir_ok && crate::state::write_private(&path, b"").is_ok();
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

/// Longest wait for each answer while an exec'd process is created and started (the
/// agent also waits up to 60 s for its streams).
const EXEC_SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The exec'd process's terminal or pipes, and what to restore afterwards.
struct ProxyIo {
    io: HostIo,
    window: Option<File>,
    saved: Option<nix::sys::termios::Termios>,
}

fn proxy_io(a: &ExecOptions, terminal: bool) -> Result<ProxyIo, LifecycleError> {
    let io_err = |e: std::io::Error| invalid(format!("exec stdio: {e}"));
    if !terminal {
        return Ok(ProxyIo {
            io: HostIo::inherited().map_err(io_err)?,
            window: None,
            saved: None,
        });
    }
    if let Some(socket) = &a.console_socket {
        let pty = console::open_pty().map_err(|e| invalid(e.to_string()))?;
        console::send_master(socket, &pty.master, &pty.name).map_err(|e| invalid(e.to_string()))?;
        let _ = nix::unistd::setsid();
        let _ = console::take_as_controlling(pty.slave.as_fd());
        let input = pty.slave.try_clone().map_err(io_err)?;
        return Ok(ProxyIo {
            window: Some(pty.slave.try_clone().map_err(io_err)?),
            io: HostIo::Terminal {
                input,
                output: pty.slave,
            },
            saved: None,
        });
    }
    if !std::io::stdin().is_terminal() {
        return Err(invalid(
            "--tty needs a --console-socket or a terminal on stdin".into(),
        ));
    }
    let saved = console::make_raw(std::io::stdin().as_fd())
        .map_err(|e| invalid(format!("raw terminal: {e}")))?;
    let dup = |f| relay::dup(f).map_err(io_err);
    Ok(ProxyIo {
        window: Some(dup(std::io::stdin().as_fd())?),
        io: HostIo::Terminal {
            input: dup(std::io::stdin().as_fd())?,
            output: dup(std::io::stdout().as_fd())?,
        },
        saved: Some(saved),
    })
}

/// Runs the process and relays it; returns its status. `started` is told once it runs.
fn proxy(
    c: &Container,
    a: &ExecOptions,
    spec: ProcessSpec,
    started: Option<ReadyWriter>,
) -> Result<i32, LifecycleError> {
    relay::block_forwarded().map_err(|e| invalid(format!("blocking signals: {e}")))?;
    let client = AgentClient::new(Arc::new(VsockDialer {
        socket: c.dir.file(files::VSOCK),
        port: AGENT_PORT,
    }));
    let id = exec_id();
    let _registered = ExecRegistration::new(c);
    // Setting the process up has a deadline; its run does not.
    let mut control = client.control_within(EXEC_SETUP_TIMEOUT)?;
    let pio = proxy_io(a, spec.terminal)?;
    control.create(&id, spec, pio.io.stdio(), false, None)?;
    let relay = Relay::attach(&client, &id, pio.io)?;
    let pid = control.start(&id)?;
    control.set_timeout(None)?;
    log::debug!("exec {id}: guest pid {pid}");
    if let Some(r) = started {
        r.ok();
    }
    let (window, c2, id2) = (pio.window, client.clone(), id.clone());
    relay::forward_signals(move |sig| forward(&c2, &id2, window.as_ref(), sig))
        .map_err(|e| invalid(format!("signal thread: {e}")))?;
    let status = control.wait(&id);
    relay.finish();
    if let Some(saved) = &pio.saved {
        console::restore(std::io::stdin().as_fd(), saved);
    }
    Ok(status?)
}

/// One forwarded signal to the exec'd process (SIGWINCH: its terminal's new size).
fn forward(client: &AgentClient, id: &str, window: Option<&File>, sig: Signal) {
    let timeout = AGENT_CALL_TIMEOUT;
    let r = match (sig, window) {
        (Signal::SIGWINCH, Some(t)) => match console::window_size(t.as_fd()) {
            Some((rows, cols)) => client
                .control_within(timeout)
                .and_then(|mut c| c.resize(id, rows, cols)),
            None => Ok(()),
        },
        (Signal::SIGWINCH, None) => Ok(()),
        _ => client
            .control_within(timeout)
            .and_then(|mut c| c.signal(id, sig as i32, false)),
    };
    if let Err(e) = r {
        log::debug!("forwarding {sig}: {e}");
    }
}

/// Runs `a` in container `a.id`; returns the process's status (with `detach`: 0 once it
/// started).
pub fn exec(g: &Globals, a: &ExecOptions) -> Result<i32, LifecycleError> {
    let c = Container::load(&g.root, &a.id)?;
    let status = c.status();
    if !matches!(status, Status::Running | Status::Created) {
        return Err(LifecycleError::WrongState {
            verb: "exec in",
            id: a.id.clone(),
            status,
        });
    }
    let spec = spec_from(a)?;
    if a.detach {
        return exec_detached(&c, a, spec);
    }
    if let Some(p) = &a.pid_file {
        write_pid_file(p, std::process::id() as i32)?;
    }
    match proxy(&c, a, spec, None) {
        Err(LifecycleError::Agent(ClientError::Exec { status, message })) => {
            eprintln!("runvm: {message}");
            Ok(status)
        }
        other => other,
    }
}

/// Forks the proxy into a session of its own and returns once the process started.
fn exec_detached(c: &Container, a: &ExecOptions, spec: ProcessSpec) -> Result<i32, LifecycleError> {
    let (ready, ready_w) = ReadyReader::pipe().map_err(LifecycleError::Spawn)?;
    // SAFETY: this process is single-threaded here; the child only runs the proxy and
    // exits.
    match unsafe { nix::unistd::fork() }.map_err(|e| LifecycleError::Spawn(e.into()))? {
        nix::unistd::ForkResult::Child => {
            drop(ready);
            let _ = nix::unistd::setsid();
            let code = match proxy(c, a, spec, Some(writer(ready_w))) {
                Ok(s) => s,
                Err(e) => {
                    log::error!("exec in {}: {}", a.id, crate::logging::error_line(&e));
                    255
                }
            };
            std::process::exit(code);
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(ready_w);
            if ready.wait().is_err() {
                let _ = nix::sys::wait::waitpid(child, None);
                return Err(invalid(format!(
                    "the process could not start in container {}",
                    a.id
                )));
            }
            if let Some(p) = &a.pid_file {
                write_pid_file(p, child.as_raw())?;
            }
            Ok(0)
        }
    }
}

fn writer(fd: OwnedFd) -> ReadyWriter {
    use std::os::fd::IntoRawFd;
    // SAFETY: the descriptor is the pipe's write end, handed over whole.
    unsafe { ReadyWriter::from_raw_fd(fd.into_raw_fd()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        exec: ExecOptions,
    }

    fn spec(args: &[&str]) -> Result<ProcessSpec, LifecycleError> {
        let a = Args::try_parse_from(std::iter::once("exec").chain(args.iter().copied())).unwrap();
        spec_from(&a.exec)
    }

    #[test]
    fn flags_shape_the_process() {
        let s = spec(&[
            "-u", "1000:100", "-e", "A=1", "--cwd", "/w", "-t", "c", "sh",
        ])
        .unwrap();
        assert_eq!((s.user.uid, s.user.gid), (1000, 100));
        assert!(s.env.contains(&"A=1".to_string()) && s.terminal);
        assert_eq!(
            (s.cwd.as_str(), s.args.as_slice()),
            ("/w", &["sh".to_string()][..])
        );
        let e = spec(&["-u", "root", "c", "sh"]).unwrap_err().to_string();
        assert!(e.contains("numeric uid"), "{e}");
        let e = spec(&["c"]).unwrap_err().to_string();
        assert!(e.contains("no command given"), "{e}");
    }

    #[test]
    fn a_proxy_that_fails_says_so_through_its_pipe() {
        let (r, w) = ReadyReader::pipe().unwrap();
        writer(w).fail("no agent");
        assert_eq!(r.wait().unwrap_err().to_string(), "no agent");
    }
}
