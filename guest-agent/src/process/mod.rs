//! The processes the agent runs: registration, stdio streams attached by the host, start,
//! signals, terminal size, and the exit status reported only once all output has been
//! written to the host.

mod error;
mod streams;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use agent_protocol::{ContainerSpec, ProcessSpec, Stdio, StreamKind};

use crate::container::{self, Helper, HelperSetup, HelperStdio};
use crate::spawn;
pub use error::{ProcessError, StartError};
use streams::{copy_in, copy_out, spawn_thread, Input};

/// How long `Start` waits for the host's stdio connections to arrive.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest process id the host may choose.
const MAX_ID_LEN: usize = 256;

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
    stdin: Option<Input>,
    /// Streams carrying input, shut down for reading when the process exits.
    input_streams: Vec<UnixStream>,
    pty: Option<File>,
    /// A container process prepared at create: its helper and stdio ends.
    prepared: Option<Prepared>,
}

impl Proc {
    fn new(spec: ProcessSpec, stdio: Stdio, init: bool, prepared: Option<Prepared>) -> Self {
        Proc {
            spec,
            stdio,
            init,
            streams: HashMap::new(),
            started: false,
            pid: prepared.as_ref().map(|p| p.helper.pid),
            status: None,
            outputs: 0,
            stdin: None,
            input_streams: Vec::new(),
            pty: None,
            prepared,
        }
    }

    fn expected_streams(&self) -> Vec<StreamKind> {
        if self.spec.terminal {
            return vec![StreamKind::Terminal];
        }
        [
            (self.stdio.stdin, StreamKind::Stdin),
            (self.stdio.stdout, StreamKind::Stdout),
            (self.stdio.stderr, StreamKind::Stderr),
        ]
        .into_iter()
        .filter_map(|(on, k)| on.then_some(k))
        .collect()
    }

    fn missing_streams(&self) -> Vec<StreamKind> {
        self.expected_streams()
            .into_iter()
            .filter(|k| !self.streams.contains_key(k))
            .collect()
    }
}

/// A container process between create and start.
#[derive(Debug)]
struct Prepared {
    helper: Helper,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
}

/// All processes of this agent.
#[derive(Debug, Default)]
pub struct Processes {
    table: Mutex<HashMap<String, Proc>>,
    changed: Condvar,
    /// The container, once its init was created.
    container: Mutex<Option<ContainerContext>>,
}

/// What later processes of the container take from it.
#[derive(Clone, Debug, Default)]
struct ContainerContext {
    /// Where the share is visible.
    share_root: String,
    /// Its seccomp profile, which every process gets.
    seccomp: Option<agent_protocol::Seccomp>,
    /// The init's capabilities: an exec'd process that names none gets these.
    capabilities: Option<agent_protocol::Capabilities>,
}

fn stdio_err(id: &str) -> impl FnOnce(std::io::Error) -> ProcessError + '_ {
    move |source| ProcessError::Stdio {
        id: id.to_string(),
        source,
    }
}

impl Processes {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Proc>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn container(&self) -> MutexGuard<'_, Option<ContainerContext>> {
        self.container.lock().unwrap_or_else(|e| e.into_inner())
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
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(ProcessError::BadId(id.into()).into());
        }
        if spec.args.is_empty() {
            return Err(spawn::fail(1, "process has no arguments".into()).into());
        }
        {
            let t = self.lock();
            if t.contains_key(id) {
                return Err(ProcessError::Exists(id.into()).into());
            }
            if init && t.values().any(|p| p.init) {
                return Err(ProcessError::InitExists.into());
            }
            if container_spec.is_some() && !init {
                return Err(ProcessError::NotInit.into());
            }
        }
        let join = match container_spec {
            Some(_) => None,
            None => self.container_init(),
        };
        let prepared = if container_spec.is_some() || join.is_some() {
            Some(self.prepare(&spec, stdio, container_spec, join)?)
        } else {
            spawn::validate(&spec)?;
            None
        };
        let mut t = self.lock();
        if let Some(p) = &prepared {
            // The helper is (or becomes) the process: it is reaped under this pid.
            if t.values().any(|q| q.pid == Some(p.helper.pid)) {
                return Err(ProcessError::PidReuse(p.helper.pid).into());
            }
        }
        t.insert(id.to_string(), Proc::new(spec, stdio, init, prepared));
        Ok(())
    }

    /// The pid of the container's init process, if a container exists and still runs.
    fn container_init(&self) -> Option<i32> {
        self.container().as_ref()?;
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
        let mut process = spec.clone();
        let context = match &container_spec {
            Some(c) => {
                let ctx = ContainerContext {
                    share_root: container::mount_share(&c.share).map_err(ProcessError::from)?,
                    seccomp: c.seccomp.clone(),
                    capabilities: spec.capabilities.clone(),
                };
                *self.container() = Some(ctx.clone());
                ctx
            }
            None => self.container().clone().unwrap_or_default(),
        };
        if process.capabilities.is_none() {
            process.capabilities = context.capabilities.clone();
        }
        let mut helper_stdio = HelperStdio::default();
        let (mut stdin, mut stdout, mut stderr) = (None, None, None);
        if !spec.terminal {
            if stdio.stdin {
                let (r, w) = spawn::pipe()?;
                helper_stdio.stdin = Some(r);
                stdin = Some(File::from(w));
            }
            if stdio.stdout {
                let (r, w) = spawn::pipe()?;
                helper_stdio.stdout = Some(w);
                stdout = Some(File::from(r));
            }
            if stdio.stderr {
                let (r, w) = spawn::pipe()?;
                helper_stdio.stderr = Some(w);
                stderr = Some(File::from(r));
            }
        }
        let setup = HelperSetup {
            container: container_spec,
            join,
            process,
            seccomp: context.seccomp,
            share_root: context.share_root,
            profile_env: spawn::profile_env(),
        };
        let helper = container::prepare(setup, helper_stdio)?;
        Ok(Prepared {
            helper,
            stdin,
            stdout,
            stderr,
        })
    }

    /// Attaches a host stdio stream to process `id` before it starts.
    pub fn attach(
        &self,
        id: &str,
        kind: StreamKind,
        stream: UnixStream,
    ) -> Result<(), ProcessError> {
        let mut t = self.lock();
        let p = t
            .get_mut(id)
            .ok_or_else(|| ProcessError::NoProcess(id.into()))?;
        if p.started {
            return Err(ProcessError::Started(id.into()));
        }
        if !p.expected_streams().contains(&kind) || p.streams.contains_key(&kind) {
            return Err(ProcessError::UnexpectedStream {
                id: id.into(),
                kind,
            });
        }
        p.streams.insert(kind, stream);
        self.changed.notify_all();
        Ok(())
    }

    /// Waits (up to [`ATTACH_TIMEOUT`]) until every stream of `id` is attached.
    fn wait_for_streams<'a>(
        &'a self,
        id: &str,
    ) -> Result<MutexGuard<'a, HashMap<String, Proc>>, ProcessError> {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        let mut t = self.lock();
        loop {
            let p = t
                .get(id)
                .ok_or_else(|| ProcessError::NoProcess(id.into()))?;
            if p.started {
                return Err(ProcessError::Started(id.into()));
            }
            let missing = p.missing_streams();
            if missing.is_empty() {
                return Ok(t);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ProcessError::NeverAttached {
                    id: id.into(),
                    missing,
                });
            }
            t = self
                .changed
                .wait_timeout(t, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Starts process `id` once its streams are attached; returns its pid.
    pub fn start(self: &Arc<Self>, id: &str) -> Result<i32, StartError> {
        let mut t = self.wait_for_streams(id)?;
        let p = t.get_mut(id).expect("checked by wait_for_streams");
        p.started = true;
        // The reaper needs this lock to record an exit, so the pid is in the table before
        // the child can be reaped.
        let (spawned, helper) = match p.prepared.take() {
            Some(prep) => {
                let pty = prep.helper.pty.as_ref().and_then(|f| f.try_clone().ok());
                let spawned = spawn::Spawned {
                    pid: prep.helper.pid,
                    stdin: prep.stdin,
                    stdout: prep.stdout,
                    stderr: prep.stderr,
                    pty,
                };
                (spawned, Some(prep.helper))
            }
            None => match spawn::spawn(&p.spec, p.stdio) {
                Ok(s) => (s, None),
                Err(e) => {
                    p.status = Some(e.status);
                    self.changed.notify_all();
                    return Err(e.into());
                }
            },
        };
        p.pid = Some(spawned.pid);
        let pid = spawned.pid;
        let outputs = wire(id, p, spawned)?;
        p.outputs = outputs.len();
        drop(t);
        for (from, to) in outputs {
            let (procs, id) = (Arc::clone(self), id.to_string());
            spawn_thread("output", move || {
                copy_out(from, to);
                procs.output_done(&id);
            });
        }
        if let Some(h) = helper {
            // The helper execs now; if it cannot, it exits with the status reported here.
            h.start()?;
        }
        Ok(pid)
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
    pub fn wait(&self, id: &str) -> Result<i32, ProcessError> {
        let mut t = self.lock();
        loop {
            let p = t
                .get(id)
                .ok_or_else(|| ProcessError::NoProcess(id.into()))?;
            if !p.started {
                return Err(ProcessError::NotStarted(id.into()));
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

    fn running_pid(&self, id: &str) -> Result<i32, ProcessError> {
        let t = self.lock();
        let p = t
            .get(id)
            .ok_or_else(|| ProcessError::NoProcess(id.into()))?;
        match (p.pid, p.status) {
            (Some(pid), None) => Ok(pid),
            (_, Some(_)) => Err(ProcessError::Exited(id.into())),
            (None, None) => Err(ProcessError::NotStarted(id.into())),
        }
    }

    /// Sends `signal` to process `id`, or to its whole process group with `all`.
    pub fn signal(&self, id: &str, signal: i32, all: bool) -> Result<(), ProcessError> {
        let pid = self.running_pid(id)?;
        let target = nix::unistd::Pid::from_raw(if all { -pid } else { pid });
        let err = |source| ProcessError::Signal {
            id: id.into(),
            signal,
            source,
        };
        let sig = nix::sys::signal::Signal::try_from(signal).map_err(err)?;
        nix::sys::signal::kill(target, sig).map_err(err)
    }

    /// Sets the terminal size of process `id`.
    pub fn resize(&self, id: &str, rows: u16, cols: u16) -> Result<(), ProcessError> {
        let t = self.lock();
        let p = t
            .get(id)
            .ok_or_else(|| ProcessError::NoProcess(id.into()))?;
        let pty = p
            .pty
            .as_ref()
            .ok_or_else(|| ProcessError::NoTerminal(id.into()))?;
        let ws = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(pty.as_fd(), ws).map_err(|source| ProcessError::Resize {
            id: id.into(),
            source,
        })
    }

    /// Closes the stdin of process `id`.
    pub fn close_stdin(&self, id: &str) -> Result<(), ProcessError> {
        let t = self.lock();
        let p = t
            .get(id)
            .ok_or_else(|| ProcessError::NoProcess(id.into()))?;
        if p.spec.terminal {
            return Err(ProcessError::TerminalInput(id.into()));
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

/// Connects a started process's stdio to its attached streams: input copies start now;
/// the output pairs (process end, host stream) are returned for the caller to start.
fn wire(
    id: &str,
    p: &mut Proc,
    spawned: spawn::Spawned,
) -> Result<Vec<(File, UnixStream)>, ProcessError> {
    let mut outputs = Vec::new();
    let mut take = |kind| p.streams.remove(&kind).expect("attached before start");
    let mut inputs = Vec::new();
    if let Some(master) = spawned.pty {
        let stream = take(StreamKind::Terminal);
        let input = master.try_clone().map_err(stdio_err(id))?;
        inputs.push((stream.try_clone().map_err(stdio_err(id))?, input, "tty-in"));
        p.pty = Some(master.try_clone().map_err(stdio_err(id))?);
        outputs.push((master, stream));
    }
    if let Some(w) = spawned.stdin {
        inputs.push((take(StreamKind::Stdin), w, "stdin"));
    }
    if let Some(r) = spawned.stdout {
        outputs.push((r, take(StreamKind::Stdout)));
    }
    if let Some(r) = spawned.stderr {
        outputs.push((r, take(StreamKind::Stderr)));
    }
    for (stream, to, name) in inputs {
        let writer: Input = Arc::new(Mutex::new(Some(to)));
        p.input_streams
            .push(stream.try_clone().map_err(stdio_err(id))?);
        let w = writer.clone();
        spawn_thread(name, move || copy_in(stream, w));
        p.stdin = Some(writer);
    }
    Ok(outputs)
}

/// The pids, as numbered inside it, of every process in the PID namespace of `init`.
fn namespace_pids(init: i32) -> Option<Vec<i32>> {
    let ns_of = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let ns = ns_of(init)?;
    let mut pids: Vec<i32> = procfs::process::all_processes()
        .ok()?
        .flatten()
        .filter(|p| ns_of(p.pid).as_ref() == Some(&ns))
        .filter_map(|p| p.status().ok()?.nspid?.last().copied())
        .collect();
    pids.sort_unstable();
    Some(pids)
}
