//! The processes the agent runs: registration, stdio streams attached by the host, start,
//! signals, terminal size, and the exit status reported only once all output has been
//! written to the host.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use agent_protocol::{ContainerSpec, ProcessSpec, Stdio, StreamKind};

use crate::container::{self, Helper, HelperSetup, HelperStdio};
use crate::spawn::{self, SpawnError};

/// How long `Start` waits for the host's stdio connections to arrive.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Proc {
    spec: ProcessSpec,
    stdio: Stdio,
    init: bool,
    streams: HashMap<StreamKind, UnixStream>,
    started: bool,
    pid: Option<i32>,
    status: Option<i32>,
    /// Output copies (stdout, stderr, terminal) still running.
    outputs: usize,
    stdin: Option<Arc<Mutex<Option<File>>>>,
    /// Streams carrying input, shut down for reading when the process exits.
    input_streams: Vec<UnixStream>,
    pty: Option<File>,
    /// A container process prepared at create: its helper and stdio ends.
    prepared: Option<Prepared>,
}

/// A container process between create and start.
#[derive(Debug)]
struct Prepared {
    helper: Helper,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
}

/// Errors answered to the host.
pub type Error = String;

/// Why a process cannot be created or started.
#[derive(Debug)]
pub enum StartError {
    /// The process cannot run; the status stands for it.
    Exec {
        status: i32,
        message: String,
    },
    Other(String),
}

impl From<String> for StartError {
    fn from(s: String) -> Self {
        StartError::Other(s)
    }
}

/// All processes of this agent.
#[derive(Debug, Default)]
pub struct Processes {
    table: Mutex<HashMap<String, Proc>>,
    changed: Condvar,
    /// Where the container's share is visible, once its init was created.
    share_root: Mutex<Option<String>>,
}

/// How long an output copy waits for more bytes before sending what it has. Every write
/// to the host is a vsock packet whose cost in the guest kernel dwarfs the bytes it
/// carries, and pipes hand over a page at a time: gathering turns a stream of 4 KiB
/// reads into 64 KiB packets for a delay too short to notice interactively.
const GATHER_WAIT_MS: i32 = 2;

fn readable_within(f: &File, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

fn copy_out(mut from: File, mut to: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut eof = false;
    while !eof {
        let mut len = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // EIO: a terminal whose last slave closed.
            Err(_) => break,
        };
        while len < buf.len() && readable_within(&from, GATHER_WAIT_MS) {
            match from.read(&mut buf[len..]) {
                Ok(0) | Err(_) => {
                    eof = true;
                    break;
                }
                Ok(n) => len += n,
            }
        }
        if to.write_all(&buf[..len]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn copy_in(mut from: UnixStream, to: Arc<Mutex<Option<File>>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut guard = to.lock().unwrap_or_else(|e| e.into_inner());
                let written = guard.as_mut().map(|f| f.write_all(&buf[..n]).is_ok());
                if written != Some(true) {
                    break;
                }
            }
        }
    }
    // End of the host's stream closes the process's stdin.
    to.lock().unwrap_or_else(|e| e.into_inner()).take();
}

impl Processes {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Proc>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers process `id`. A plain process is only checked now (its executable) and
    /// started by `start`; a container process is prepared now by a helper, blocked before
    /// exec.
    pub fn create(
        &self,
        id: &str,
        spec: ProcessSpec,
        stdio: Stdio,
        init: bool,
        container_spec: Option<ContainerSpec>,
    ) -> Result<(), StartError> {
        if id.is_empty() || id.len() > 256 {
            return Err(format!("invalid process id {id:?}").into());
        }
        if spec.args.is_empty() {
            return Err(StartError::Exec {
                status: 1,
                message: "process has no arguments".into(),
            });
        }
        {
            let t = self.lock();
            if t.contains_key(id) {
                return Err(format!("process {id} already exists").into());
            }
            if init && t.values().any(|p| p.init) {
                return Err(StartError::Other("an init process already exists".into()));
            }
            if container_spec.is_some() && !init {
                return Err(StartError::Other(
                    "only the init process creates the container".into(),
                ));
            }
        }
        let join = if container_spec.is_some() {
            None
        } else {
            self.container_init()
        };
        let prepared = if container_spec.is_some() || join.is_some() {
            Some(self.prepare(&spec, stdio, container_spec, join)?)
        } else {
            spawn::validate(&spec).map_err(|e| StartError::Exec {
                status: e.status,
                message: e.message,
            })?;
            None
        };
        let mut t = self.lock();
        if let Some(p) = &prepared {
            // The helper is (or becomes) the process: it is reaped under this pid.
            if t.values().any(|q| q.pid == Some(p.helper.pid)) {
                return Err(StartError::Other("pid reuse".into()));
            }
        }
        let pid = prepared.as_ref().map(|p| p.helper.pid);
        t.insert(
            id.to_string(),
            Proc {
                spec,
                stdio,
                init,
                streams: HashMap::new(),
                started: false,
                pid,
                status: None,
                outputs: 0,
                stdin: None,
                input_streams: Vec::new(),
                pty: None,
                prepared,
            },
        );
        Ok(())
    }

    /// The pid of the container's init process, if a container exists and still runs.
    fn container_init(&self) -> Option<i32> {
        self.share_root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()?;
        let t = self.lock();
        t.values()
            .find(|p| p.init && p.status.is_none())
            .and_then(|p| p.pid)
    }

    fn prepare(
        &self,
        spec: &ProcessSpec,
        stdio: Stdio,
        container_spec: Option<ContainerSpec>,
        join: Option<i32>,
    ) -> Result<Prepared, StartError> {
        let exec_err = |e: SpawnError| StartError::Exec {
            status: e.status,
            message: e.message,
        };
        let share_root = match &container_spec {
            Some(c) => {
                let root = container::mount_share(&c.share).map_err(StartError::Other)?;
                *self.share_root.lock().unwrap_or_else(|e| e.into_inner()) = Some(root.clone());
                root
            }
            None => self
                .share_root
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default(),
        };
        let mut helper_stdio = HelperStdio::default();
        let (mut stdin, mut stdout, mut stderr) = (None, None, None);
        if !spec.terminal {
            if stdio.stdin {
                let (r, w) = spawn::pipe().map_err(exec_err)?;
                helper_stdio.stdin = Some(r);
                stdin = Some(File::from(w));
            }
            if stdio.stdout {
                let (r, w) = spawn::pipe().map_err(exec_err)?;
                helper_stdio.stdout = Some(w);
                stdout = Some(File::from(r));
            }
            if stdio.stderr {
                let (r, w) = spawn::pipe().map_err(exec_err)?;
                helper_stdio.stderr = Some(w);
                stderr = Some(File::from(r));
            }
        }
        let setup = HelperSetup {
            container: container_spec,
            join,
            process: spec.clone(),
            share_root,
            profile_env: spawn::profile_env(),
        };
        let helper = container::prepare(setup, helper_stdio).map_err(exec_err)?;
        Ok(Prepared {
            helper,
            stdin,
            stdout,
            stderr,
        })
    }

    /// Attaches a host stdio stream to process `id` before it starts.
    pub fn attach(&self, id: &str, kind: StreamKind, stream: UnixStream) -> Result<(), Error> {
        let mut t = self.lock();
        let p = t.get_mut(id).ok_or_else(|| format!("no process {id}"))?;
        if p.started {
            return Err(format!("process {id} already started"));
        }
        let wanted = match kind {
            StreamKind::Terminal => p.spec.terminal,
            StreamKind::Stdin => !p.spec.terminal && p.stdio.stdin,
            StreamKind::Stdout => !p.spec.terminal && p.stdio.stdout,
            StreamKind::Stderr => !p.spec.terminal && p.stdio.stderr,
        };
        if !wanted || p.streams.contains_key(&kind) {
            return Err(format!("process {id} does not expect a {kind:?} stream"));
        }
        p.streams.insert(kind, stream);
        self.changed.notify_all();
        Ok(())
    }

    fn expected_streams(p: &Proc) -> Vec<StreamKind> {
        if p.spec.terminal {
            return vec![StreamKind::Terminal];
        }
        [
            (p.stdio.stdin, StreamKind::Stdin),
            (p.stdio.stdout, StreamKind::Stdout),
            (p.stdio.stderr, StreamKind::Stderr),
        ]
        .into_iter()
        .filter_map(|(on, k)| on.then_some(k))
        .collect()
    }

    /// Starts process `id` once its streams are attached; returns its pid.
    pub fn start(self: &Arc<Self>, id: &str) -> Result<i32, StartError> {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        let mut t = self.lock();
        loop {
            let p = t.get(id).ok_or_else(|| format!("no process {id}"))?;
            if p.started {
                return Err(format!("process {id} already started").into());
            }
            let missing: Vec<_> = Self::expected_streams(p)
                .into_iter()
                .filter(|k| !p.streams.contains_key(k))
                .collect();
            if missing.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("process {id}: streams {missing:?} never attached").into());
            }
            t = self
                .changed
                .wait_timeout(t, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let p = t.get_mut(id).expect("checked above");
        p.started = true;
        // The reaper needs this lock to record an exit, so the pid is in the table before
        // the child can be reaped.
        let mut helper = None;
        let spawned = match p.prepared.take() {
            Some(prep) => {
                let pid = prep.helper.pid;
                let pty = prep.helper.pty.as_ref().and_then(|f| f.try_clone().ok());
                helper = Some(prep.helper);
                spawn::Spawned {
                    pid,
                    stdin: prep.stdin,
                    stdout: prep.stdout,
                    stderr: prep.stderr,
                    pty,
                }
            }
            None => match spawn::spawn(&p.spec, p.stdio) {
                Ok(s) => s,
                Err(SpawnError { status, message }) => {
                    p.status = Some(status);
                    self.changed.notify_all();
                    return Err(StartError::Exec { status, message });
                }
            },
        };
        p.pid = Some(spawned.pid);
        let mut outputs = Vec::new();
        if let Some(master) = spawned.pty {
            let stream = p.streams.remove(&StreamKind::Terminal).expect("attached");
            let (input, output) = match (master.try_clone(), stream.try_clone()) {
                (Ok(m), Ok(s)) => (m, s),
                _ => return Err(StartError::Other("duplicating terminal descriptors".into())),
            };
            let writer = Arc::new(Mutex::new(Some(input)));
            p.input_streams
                .push(output.try_clone().map_err(|e| e.to_string())?);
            spawn_thread("tty-in", {
                let w = writer.clone();
                move || copy_in(output, w)
            });
            p.stdin = Some(writer);
            p.pty = Some(master.try_clone().map_err(|e| e.to_string())?);
            outputs.push((master, stream));
        }
        if let Some(w) = spawned.stdin {
            let stream = p.streams.remove(&StreamKind::Stdin).expect("attached");
            let writer = Arc::new(Mutex::new(Some(w)));
            p.input_streams
                .push(stream.try_clone().map_err(|e| e.to_string())?);
            spawn_thread("stdin", {
                let w = writer.clone();
                move || copy_in(stream, w)
            });
            p.stdin = Some(writer);
        }
        if let Some(r) = spawned.stdout {
            outputs.push((r, p.streams.remove(&StreamKind::Stdout).expect("attached")));
        }
        if let Some(r) = spawned.stderr {
            outputs.push((r, p.streams.remove(&StreamKind::Stderr).expect("attached")));
        }
        p.outputs = outputs.len();
        drop(t);
        for (from, to) in outputs {
            let procs = Arc::clone(self);
            let id = id.to_string();
            spawn_thread("output", move || {
                copy_out(from, to);
                procs.output_done(&id);
            });
        }
        if let Some(h) = helper {
            // The helper execs now; if it cannot, it exits with the status reported here.
            h.start().map_err(|e| StartError::Exec {
                status: e.status,
                message: e.message,
            })?;
        }
        Ok(spawned.pid)
    }

    fn output_done(&self, id: &str) {
        let mut t = self.lock();
        if let Some(p) = t.get_mut(id) {
            p.outputs = p.outputs.saturating_sub(1);
        }
        self.changed.notify_all();
    }

    /// The reaper saw `pid` exit with `status`.
    pub fn reaped(&self, pid: i32, status: i32) {
        let mut t = self.lock();
        if let Some(p) = t
            .values_mut()
            .find(|p| p.pid == Some(pid) && p.status.is_none())
        {
            p.status = Some(status);
            // Input has nowhere to go any more: wake the stdin copies.
            for s in p.input_streams.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Read);
            }
            self.changed.notify_all();
        }
    }

    /// Waits until process `id` has exited and all its output reached the host; returns
    /// its exit status.
    pub fn wait(&self, id: &str) -> Result<i32, Error> {
        let mut t = self.lock();
        loop {
            let p = t.get(id).ok_or_else(|| format!("no process {id}"))?;
            if !p.started {
                return Err(format!("process {id} has not started"));
            }
            if let (Some(status), 0) = (p.status, p.outputs) {
                return Ok(status);
            }
            t = self.changed.wait(t).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether `id` is the init process and has exited.
    pub fn is_finished_init(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|p| p.init && p.status.is_some())
    }

    fn running_pid(&self, id: &str) -> Result<i32, Error> {
        let t = self.lock();
        let p = t.get(id).ok_or_else(|| format!("no process {id}"))?;
        match (p.pid, p.status) {
            (Some(pid), None) => Ok(pid),
            (_, Some(_)) => Err(format!("process {id} has exited")),
            (None, None) => Err(format!("process {id} has not started")),
        }
    }

    /// Sends `signal` to process `id`, or to its whole process group with `all`.
    pub fn signal(&self, id: &str, signal: i32, all: bool) -> Result<(), Error> {
        let pid = self.running_pid(id)?;
        let target = if all { -pid } else { pid };
        // SAFETY: kill(2) with plain integers; a bad signal number is an EINVAL.
        if unsafe { libc::kill(target, signal) } != 0 {
            return Err(format!(
                "signal {signal} to process {id}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Sets the terminal size of process `id`.
    pub fn resize(&self, id: &str, rows: u16, cols: u16) -> Result<(), Error> {
        let t = self.lock();
        let p = t.get(id).ok_or_else(|| format!("no process {id}"))?;
        let pty = p
            .pty
            .as_ref()
            .ok_or_else(|| format!("process {id} has no terminal"))?;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(format!(
                "resizing terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Closes the stdin of process `id`.
    pub fn close_stdin(&self, id: &str) -> Result<(), Error> {
        let t = self.lock();
        let p = t.get(id).ok_or_else(|| format!("no process {id}"))?;
        if p.spec.terminal {
            return Err(format!(
                "process {id} reads a terminal, which cannot be closed apart"
            ));
        }
        if let Some(w) = &p.stdin {
            w.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        Ok(())
    }

    /// Pids of the processes that still run: with a container, every process of its PID
    /// namespace as the container numbers them; otherwise the processes the agent started.
    pub fn pids(&self) -> Vec<i32> {
        if let Some(init) = self.container_init() {
            if let Some(pids) = namespace_pids(init) {
                return pids;
            }
        }
        self.own_pids()
    }

    fn own_pids(&self) -> Vec<i32> {
        let t = self.lock();
        let mut v: Vec<i32> = t
            .values()
            .filter(|p| p.status.is_none())
            .filter_map(|p| p.pid)
            .collect();
        v.sort_unstable();
        v
    }
}

/// The pids, as numbered inside it, of every process in the PID namespace of `init`.
fn namespace_pids(init: i32) -> Option<Vec<i32>> {
    let ns = std::fs::read_link(format!("/proc/{init}/ns/pid")).ok()?;
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid"))
            .ok()
            .as_ref()
            != Some(&ns)
        {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let inner = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|v| v.split_whitespace().last()?.parse().ok());
        if let Some(p) = inner {
            pids.push(p);
        }
    }
    pids.sort_unstable();
    Some(pids)
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        eprintln!("runvm-agent: thread {name}: {e}");
    }
}
