//! The VMM process of one container: it is the pid runvm reports, lives as long as the
//! container, and exits with the container process's status (code, or 128 + signal).
//!
//! Order of work: a private mount namespace (before any thread), the share, the terminal,
//! the VM, the container's init prepared by the agent (blocked before exec), the control
//! socket; then "ready" to `create`. It serves `start`, `kill`, `pause`, `resume`, `ps` and
//! `events` on the control socket, forwards catchable signals it receives to the container
//! process, proxies stdio, and ends the VM once the container process's status and all of
//! its output are in.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use agent_protocol::{Stdio, StreamKind};
use nix::sys::signal::{SigSet, Signal};
use vmm::{ConsoleOutput, VmConfig, VmHandle};

use crate::agent_client::{AgentClient, ClientError, Control};
use crate::console::{self, HostPty};
use crate::control::{self, ControlRequest, ControlResponse, Stats};
use crate::sandbox::Sandbox;
use crate::state::{files, StateDir};
use crate::translate::{NetworkNs, Plan};
use crate::{cgroup, share};

/// Id of the container's process in the agent.
pub const INIT_ID: &str = "init";
/// How long the agent may take to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the VM may take to end after the container process's status arrived.
const END_GRACE: Duration = Duration::from_secs(10);
/// Status reported when the container's VM died before its process finished.
pub const VM_DIED_STATUS: i32 = 255;

/// What the supervisor needs.
#[derive(Debug)]
pub struct SupervisorConfig {
    pub state: StateDir,
    pub plan: Plan,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub console_socket: Option<PathBuf>,
    /// The caller's own terminal is the container's (`run` in the foreground).
    pub own_tty: bool,
    /// Start right after create (`run`).
    pub auto_start: bool,
    pub systemd_cgroup: bool,
}

/// The container's terminal on the host side.
enum Tty {
    /// A pty whose master went over the console socket.
    Pty(HostPty),
    /// The caller's terminal (raw while the container runs).
    Own(nix::sys::termios::Termios),
}

/// Everything prepared by `prepare`.
pub struct Prepared {
    sandbox: Sandbox,
    client: AgentClient,
    control: Control,
    outputs: Vec<JoinHandle<()>>,
    tty: Option<Tty>,
    terminal_stream: Option<UnixStream>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").finish_non_exhaustive()
    }
}

/// Signals forwarded to the container process (by the VMM) or to an exec'd process (by its
/// proxy); SIGWINCH becomes a terminal resize.
pub const FORWARDED: [Signal; 9] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCONT,
    Signal::SIGALRM,
];

fn forwarded_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set
}

fn copy_then<R: Read, W: Write>(mut from: R, mut to: W, then: impl FnOnce(W)) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = to.flush();
    then(to);
}

fn dup_std(fd: impl AsFd) -> std::io::Result<File> {
    Ok(File::from(fd.as_fd().try_clone_to_owned()?))
}

/// Puts the VMM process in the container's network namespace (see [`NetworkNs`]).
fn enter_network_namespace(ns: &NetworkNs) -> Result<(), String> {
    use nix::sched::{setns, unshare, CloneFlags};
    match ns {
        NetworkNs::Host => Ok(()),
        NetworkNs::New => {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("new network namespace: {e}"))
        }
        NetworkNs::Join(path) => {
            let f = File::open(path)
                .map_err(|e| format!("network namespace {}: {e}", path.display()))?;
            setns(f, CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("joining network namespace {}: {e}", path.display()))
        }
    }
}

/// Prepares the container: everything up to the init process blocked before exec.
/// Must be called before the process has any thread.
pub fn prepare(cfg: &SupervisorConfig) -> Result<Prepared, String> {
    // Catchable signals wait for the signal thread; threads started later inherit this.
    forwarded_set()
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;
    // SAFETY: ignoring SIGPIPE; failed writes then report EPIPE instead.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    enter_network_namespace(&cfg.plan.network)?;
    share::private_mount_namespace().map_err(|e| e.to_string())?;
    let share_dir = cfg.state.file(files::SHARE);
    share::build(
        &share_dir,
        &cfg.plan.rootfs,
        cfg.plan.root_readonly,
        &cfg.plan.binds,
    )
    .map_err(|e| e.to_string())?;
    if let Some(path) = &cfg.plan.cgroups_path {
        cgroup::join(path, &cfg.plan.resources, cfg.systemd_cgroup).map_err(|e| e.to_string())?;
    }

    let terminal = cfg.plan.process.terminal;
    let tty = if !terminal {
        None
    } else if let Some(socket) = &cfg.console_socket {
        let pty = console::open_pty().map_err(|e| e.to_string())?;
        console::send_master(socket, &pty.master, &pty.name).map_err(|e| e.to_string())?;
        // Its size changes now reach us as SIGWINCH.
        if let Err(e) = console::take_as_controlling(pty.slave.as_fd()) {
            log::debug!("terminal resize will not be followed: {e}");
        }
        Some(Tty::Pty(pty))
    } else if cfg.own_tty {
        let saved = console::make_raw(std::io::stdin().as_fd())
            .map_err(|e| format!("raw terminal: {e}"))?;
        Some(Tty::Own(saved))
    } else {
        return Err("process.terminal is set but no --console-socket was given".into());
    };

    let mut vm = VmConfig::new(&cfg.kernel);
    vm.initrd = Some(cfg.initrd.clone());
    vm.mem_mib = cfg.plan.sizing.mem_mib;
    vm.vcpus = cfg.plan.sizing.vcpus;
    vm.cmdline = cfg.plan.sizing.kernel_params.clone();
    vm.console = ConsoleOutput::File(cfg.state.file(files::CONSOLE_LOG));
    let sandbox = Sandbox::boot_with_share(
        vm,
        &cfg.state.file(files::VSOCK),
        Some(&share_dir),
        READY_TIMEOUT,
    )
    .map_err(|e| e.to_string())?;
    let client = sandbox.client().clone();
    let result = create_init(cfg, &client, terminal, tty);
    match result {
        Ok((control, outputs, tty, terminal_stream)) => Ok(Prepared {
            sandbox,
            client,
            control,
            outputs,
            tty,
            terminal_stream,
        }),
        Err(e) => {
            let _ = sandbox.finish(Duration::ZERO);
            Err(e)
        }
    }
}

type Created = (
    Control,
    Vec<JoinHandle<()>>,
    Option<Tty>,
    Option<UnixStream>,
);

fn create_init(
    cfg: &SupervisorConfig,
    client: &AgentClient,
    terminal: bool,
    tty: Option<Tty>,
) -> Result<Created, String> {
    let mut control = client.control().map_err(|e| e.to_string())?;
    let stdio = Stdio {
        stdin: !terminal,
        stdout: !terminal,
        stderr: !terminal,
    };
    control
        .create(
            INIT_ID,
            cfg.plan.process.clone(),
            stdio,
            true,
            Some(cfg.plan.container.clone()),
        )
        .map_err(|e| e.to_string())?;
    let mut outputs = Vec::new();
    let mut terminal_stream = None;
    if terminal {
        let stream = client
            .attach(INIT_ID, StreamKind::Terminal)
            .map_err(|e| e.to_string())?;
        let (input, output): (File, File) = match &tty {
            Some(Tty::Pty(p)) => (
                p.slave.try_clone().map_err(|e| e.to_string())?,
                p.slave.try_clone().map_err(|e| e.to_string())?,
            ),
            _ => (
                dup_std(std::io::stdin()).map_err(|e| e.to_string())?,
                dup_std(std::io::stdout()).map_err(|e| e.to_string())?,
            ),
        };
        let to_guest = stream.try_clone().map_err(|e| e.to_string())?;
        std::thread::spawn(move || copy_then(input, to_guest, |_| {}));
        let from_guest = stream.try_clone().map_err(|e| e.to_string())?;
        outputs.push(std::thread::spawn(move || {
            copy_then(from_guest, output, |_| {})
        }));
        terminal_stream = Some(stream);
    } else {
        let stdin = client
            .attach(INIT_ID, StreamKind::Stdin)
            .map_err(|e| e.to_string())?;
        let host_in = dup_std(std::io::stdin()).map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            copy_then(host_in, stdin, |s| {
                let _ = s.shutdown(std::net::Shutdown::Write);
            })
        });
        for (kind, out) in [
            (StreamKind::Stdout, dup_std(std::io::stdout())),
            (StreamKind::Stderr, dup_std(std::io::stderr())),
        ] {
            let s = client.attach(INIT_ID, kind).map_err(|e| e.to_string())?;
            let out = out.map_err(|e| e.to_string())?;
            outputs.push(std::thread::spawn(move || copy_then(s, out, |_| {})));
        }
    }
    Ok((control, outputs, tty, terminal_stream))
}

/// What the control thread asks of the main thread.
enum MainRequest {
    Start(mpsc::Sender<ControlResponse>),
    /// The VM ended (or was stopped): the status to exit with.
    Ended,
}

/// Ends the VM on behalf of a signal: the container's status becomes 128 + `signal`.
#[derive(Clone)]
struct Stopper {
    vm: VmHandle,
    status: Arc<Mutex<Option<i32>>>,
}

impl Stopper {
    fn stop(&self, signal: i32) {
        crate::util::lock(&self.status).get_or_insert(128 + signal);
        self.vm.stop();
    }

    fn status(&self) -> i32 {
        crate::util::lock(&self.status).unwrap_or(VM_DIED_STATUS)
    }
}

fn vmm_stats(mem_mib: u64, pids: u64) -> Stats {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let ticks: u64 = stat
        .rfind(')')
        .map(|i| &stat[i + 2..])
        .map(|rest| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Stats {
        memory_rss_bytes: rss_kib * 1024,
        memory_limit_bytes: mem_mib << 20,
        cpu_total_ns: ticks * 1_000_000_000 / hz,
        pids,
    }
}

fn serve_control(
    listener: UnixListener,
    client: AgentClient,
    stopper: Stopper,
    main: mpsc::Sender<MainRequest>,
    started: Arc<Mutex<bool>>,
    mem_mib: u64,
) {
    let vm = stopper.vm.clone();
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let Some(req) = control::read_request(&mut s) else {
            continue;
        };
        let agent = |f: &dyn Fn(&mut Control) -> Result<ControlResponse, ClientError>| match client
            .control()
        {
            Ok(mut c) => f(&mut c).unwrap_or_else(|e| ControlResponse::Error {
                message: e.to_string(),
            }),
            Err(e) => ControlResponse::Error {
                message: e.to_string(),
            },
        };
        let response = match req {
            ControlRequest::Start => {
                let (tx, rx) = mpsc::channel();
                if main.send(MainRequest::Start(tx)).is_err() {
                    ControlResponse::Error {
                        message: "the container is ending".into(),
                    }
                } else {
                    rx.recv().unwrap_or(ControlResponse::Error {
                        message: "the container ended".into(),
                    })
                }
            }
            ControlRequest::Kill { signal, all } => {
                let is_started = *crate::util::lock(&started);
                if signal == libc::SIGKILL || !is_started {
                    // SIGKILL takes the whole VM down; so does any signal before the process
                    // exists (nothing else could receive it).
                    stopper.stop(signal);
                    ControlResponse::Ok
                } else {
                    agent(&|c| c.signal(INIT_ID, signal, all).map(|_| ControlResponse::Ok))
                }
            }
            ControlRequest::Pause => {
                vm.pause();
                ControlResponse::Ok
            }
            ControlRequest::Resume => {
                vm.resume();
                ControlResponse::Ok
            }
            ControlRequest::Pids => agent(&|c| c.pids().map(|pids| ControlResponse::Pids { pids })),
            ControlRequest::Stats => {
                let pids = client
                    .control()
                    .and_then(|mut c| c.pids())
                    .map(|p| p.len() as u64)
                    .unwrap_or(0);
                ControlResponse::Stats {
                    stats: vmm_stats(mem_mib, pids),
                }
            }
        };
        control::respond(&mut s, &response);
    }
}

fn forward_signals(
    client: AgentClient,
    stopper: Stopper,
    started: Arc<Mutex<bool>>,
    tty: Option<File>,
) {
    let set = forwarded_set();
    loop {
        let Ok(sig) = set.wait() else { return };
        let is_started = *crate::util::lock(&started);
        let result = match (sig, &tty) {
            (Signal::SIGWINCH, Some(t)) => match console::window_size(t.as_fd()) {
                Some((rows, cols)) => client
                    .control()
                    .and_then(|mut c| c.resize(INIT_ID, rows, cols)),
                None => Ok(()),
            },
            (Signal::SIGWINCH, None) => Ok(()),
            _ if !is_started => {
                stopper.stop(sig as i32);
                Ok(())
            }
            _ => client
                .control()
                .and_then(|mut c| c.signal(INIT_ID, sig as i32, false)),
        };
        if let Err(e) = result {
            log::debug!("forwarding {sig}: {e}");
        }
    }
}

/// Tells `create` how preparing went, through the ready pipe.
pub fn report_ready(pipe: Option<OwnedFd>, result: &Result<(), String>) {
    if let Some(fd) = pipe {
        let mut f = File::from(fd);
        let line = match result {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("error: {}\n", e.replace('\n', " ")),
        };
        let _ = f.write_all(line.as_bytes());
    }
}

/// Runs the prepared container to its end; returns the exit status for the VMM process.
pub fn run(cfg: &SupervisorConfig, p: Prepared, ready: Option<OwnedFd>) -> i32 {
    let Prepared {
        sandbox,
        client,
        mut control,
        outputs,
        tty,
        terminal_stream,
    } = p;
    let ctl_path = cfg.state.file(files::CONTROL);
    let _ = std::fs::remove_file(&ctl_path);
    let listener = match vmm::unix_path::bind(&ctl_path) {
        Ok(l) => l,
        Err(e) => {
            report_ready(
                ready,
                &Err(format!("control socket {}: {e}", ctl_path.display())),
            );
            let _ = sandbox.finish(Duration::ZERO);
            return 1;
        }
    };
    let (tx, rx) = mpsc::channel::<MainRequest>();
    let started = Arc::new(Mutex::new(false));
    let stopper = Stopper {
        vm: sandbox.handle(),
        status: Arc::new(Mutex::new(None)),
    };
    {
        let (client, stopper, tx, started) =
            (client.clone(), stopper.clone(), tx.clone(), started.clone());
        let mem = cfg.plan.sizing.mem_mib;
        std::thread::spawn(move || serve_control(listener, client, stopper, tx, started, mem));
    }
    {
        let tty_file = match &tty {
            Some(Tty::Pty(p)) => p.slave.try_clone().ok(),
            Some(Tty::Own(_)) => dup_std(std::io::stdin()).ok(),
            None => None,
        };
        let (client, stopper, started) = (client.clone(), stopper.clone(), started.clone());
        std::thread::spawn(move || forward_signals(client, stopper, started, tty_file));
    }
    // The VM's end unblocks the main thread wherever it waits.
    {
        let vm = sandbox.handle();
        let tx = tx.clone();
        let watched = control.try_clone_stream().ok();
        std::thread::spawn(move || {
            vm.wait_ended(None);
            if let Some(s) = watched {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            let _ = tx.send(MainRequest::Ended);
        });
    }
    report_ready(ready, &Ok(()));

    let status = match wait_for_start(cfg, &rx, &mut control, &started) {
        Err(()) => stopper.status(),
        Ok(Err(status)) => status,
        Ok(Ok(())) => match control.wait(INIT_ID) {
            Ok(status) => status,
            Err(e) => {
                let status = stopper.status();
                if status == VM_DIED_STATUS {
                    log::error!(
                        "container {}: lost the container process: {e}",
                        cfg.state.id
                    );
                }
                status
            }
        },
    };
    // All output is delivered before the status is. If the VM is gone, its streams close
    // only once the VMM lets go of the device: end it first.
    let vm_gone = sandbox.handle().wait_ended(Some(Duration::ZERO)).is_some();
    drop(terminal_stream);
    let exit = if vm_gone {
        drop(control);
        let exit = sandbox.finish(Duration::ZERO);
        for t in outputs {
            let _ = t.join();
        }
        exit
    } else {
        for t in outputs {
            let _ = t.join();
        }
        drop(control);
        sandbox.finish(END_GRACE)
    };
    if let Some(Tty::Own(saved)) = &tty {
        console::restore(std::io::stdin().as_fd(), saved);
    }
    let _ = std::fs::write(cfg.state.file(files::EXIT), format!("{status}\n"));
    log::debug!(
        "container {}: VM ended ({exit}), status {status}",
        cfg.state.id
    );
    status
}

/// Waits for `start` (or starts at once with `auto_start`). `Err(())`: the VM ended
/// first; `Ok(Err(status))`: the process could not start and `status` stands for it.
fn wait_for_start(
    cfg: &SupervisorConfig,
    rx: &mpsc::Receiver<MainRequest>,
    control: &mut Control,
    started: &Arc<Mutex<bool>>,
) -> Result<Result<(), i32>, ()> {
    let start = |control: &mut Control| -> ControlResponse {
        match control.start(INIT_ID) {
            Ok(_) => {
                *crate::util::lock(started) = true;
                ControlResponse::Ok
            }
            Err(e) => ControlResponse::Error {
                message: e.to_string(),
            },
        }
    };
    if cfg.auto_start {
        return Ok(match start(control) {
            ControlResponse::Ok => Ok(()),
            ControlResponse::Error { message } => {
                eprintln!("runvm: {message}");
                Err(control.wait(INIT_ID).unwrap_or(1))
            }
            _ => Err(1),
        });
    }
    match rx.recv() {
        Ok(MainRequest::Start(reply)) => {
            let r = start(control);
            let ok = r == ControlResponse::Ok;
            let _ = reply.send(r);
            if ok {
                return Ok(Ok(()));
            }
            // The process could not exec: its status stands.
            Ok(Err(control.wait(INIT_ID).unwrap_or(1)))
        }
        Ok(MainRequest::Ended) | Err(_) => Err(()),
    }
}
