//! The host side of the agent protocol: dialing the agent (through the VM's vsock socket,
//! or a host-mode agent's Unix socket), control requests, stdio streams, and running one
//! process with its stdio relayed (see `relay`).
//!
//! The exit status is returned only after stdout and stderr reached end of stream, which
//! the agent sends once the process's output is fully written: all output reaches the
//! host before the status does.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent_protocol::{
    read_frame, write_frame, ContainerSpec, FrameError, Hello, ProcessSpec, Request, Response,
    Stdio, StreamKind, PROTOCOL_VERSION,
};

use crate::relay::{HostIo, Relay};

/// How long the VMM may take to answer a `CONNECT` (the guest must accept the
/// connection) and the agent its hello.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent through {path}: {source}")]
    Dial {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the VM refused the connection to guest port {port} (no agent listening)")]
    Refused { port: u32 },
    #[error("agent protocol: {0}")]
    Frame(#[from] FrameError),
    #[error("agent: {0}")]
    Agent(String),
    /// The process cannot run; `status` stands for it (127 not found, 126 not executable).
    #[error("{message}")]
    Exec { status: i32, message: String },
    #[error("unexpected answer from the agent: {0:?}")]
    Unexpected(Response),
    #[error("stdio stream: {0}")]
    Stream(#[source] io::Error),
}

/// Opens a byte stream to the agent.
pub trait Dial: Send + Sync + std::fmt::Debug {
    fn dial(&self) -> Result<UnixStream, ClientError>;
}

/// A host-mode agent listening on a Unix socket.
#[derive(Debug, Clone)]
pub struct UnixDialer(pub PathBuf);

impl Dial for UnixDialer {
    fn dial(&self) -> Result<UnixStream, ClientError> {
        vmm::unix_path::connect(&self.0).map_err(|source| ClientError::Dial {
            path: self.0.clone(),
            source,
        })
    }
}

/// An agent in a VM, reached through the VMM's vsock socket (`CONNECT <port>`).
#[derive(Debug, Clone)]
pub struct VsockDialer {
    pub socket: PathBuf,
    pub port: u32,
}

impl Dial for VsockDialer {
    fn dial(&self) -> Result<UnixStream, ClientError> {
        connect_vsock(&self.socket, self.port)
    }
}

/// Connects to guest `port` through the vsock socket at `socket`.
pub fn connect_vsock(socket: &Path, port: u32) -> Result<UnixStream, ClientError> {
    let dial_err = |source| ClientError::Dial {
        path: socket.to_path_buf(),
        source,
    };
    let mut s = vmm::unix_path::connect(socket).map_err(dial_err)?;
    s.set_read_timeout(Some(DIAL_TIMEOUT)).map_err(dial_err)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(dial_err)?;
    // Read the answer byte by byte: what follows the line belongs to the caller.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Err(ClientError::Refused { port }),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 64 => line.push(b[0]),
            Ok(_) => return Err(ClientError::Refused { port }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ClientError::Refused { port })
            }
            Err(e) => return Err(dial_err(e)),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(ClientError::Refused { port });
    }
    s.set_read_timeout(None).map_err(dial_err)?;
    Ok(s)
}

/// A client of one agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    dialer: Arc<dyn Dial>,
}

/// A control connection.
#[derive(Debug)]
pub struct Control {
    stream: UnixStream,
    pub agent: String,
}

impl Control {
    /// Sets how long each answer may take (None: no limit, for `wait`).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(ClientError::Stream)
    }
}

impl AgentClient {
    /// A client that reaches the agent through `dialer`.
    pub fn new(dialer: Arc<dyn Dial>) -> Self {
        AgentClient { dialer }
    }

    /// Opens a control connection.
    pub fn control(&self) -> Result<Control, ClientError> {
        let mut stream = self.dialer.dial()?;
        write_frame(
            &mut stream,
            &Hello::Control {
                version: PROTOCOL_VERSION,
            },
        )?;
        let _ = stream.set_read_timeout(Some(DIAL_TIMEOUT));
        let welcome = read_frame(&mut stream)?;
        let _ = stream.set_read_timeout(None);
        match welcome {
            Response::Welcome { agent, .. } => Ok(Control { stream, agent }),
            Response::Error { message } => Err(ClientError::Agent(message)),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Opens a control connection whose every answer must come within `timeout`.
    pub fn control_within(&self, timeout: Duration) -> Result<Control, ClientError> {
        let c = self.control()?;
        c.stream
            .set_read_timeout(Some(timeout))
            .map_err(ClientError::Stream)?;
        Ok(c)
    }

    /// Opens the `kind` stream of process `process`.
    pub fn attach(&self, process: &str, kind: StreamKind) -> Result<UnixStream, ClientError> {
        let mut stream = self.dialer.dial()?;
        write_frame(
            &mut stream,
            &Hello::Stream {
                version: PROTOCOL_VERSION,
                process: process.to_string(),
                stream: kind,
            },
        )?;
        Ok(stream)
    }
}

impl Control {
    /// A second handle on the connection, to shut it down from another thread.
    pub fn try_clone_stream(&self) -> io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// Sends one request and returns its answer; agent errors become `Err`.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        write_frame(&mut self.stream, request)?;
        match read_frame(&mut self.stream)? {
            Response::Error { message } => Err(ClientError::Agent(message)),
            Response::ExecFailed { status, message } => Err(ClientError::Exec { status, message }),
            r => Ok(r),
        }
    }

    fn expect_ok(&mut self, request: &Request) -> Result<(), ClientError> {
        match self.call(request)? {
            Response::Ok => Ok(()),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Registers process `id`. With `container`, it is the container's init and the agent
    /// prepares the container's root and namespaces now.
    pub fn create(
        &mut self,
        id: &str,
        process: ProcessSpec,
        stdio: Stdio,
        init: bool,
        container: Option<ContainerSpec>,
    ) -> Result<(), ClientError> {
        self.expect_ok(&Request::Create {
            id: id.into(),
            process: Box::new(process),
            stdio,
            init,
            container: container.map(Box::new),
        })
    }

    /// Starts process `id`; returns its guest pid.
    pub fn start(&mut self, id: &str) -> Result<i32, ClientError> {
        match self.call(&Request::Start { id: id.into() })? {
            Response::Started { pid } => Ok(pid),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Waits for process `id`; returns its exit status (code or 128 + signal).
    pub fn wait(&mut self, id: &str) -> Result<i32, ClientError> {
        match self.call(&Request::Wait { id: id.into() })? {
            Response::Exited { status } => Ok(status),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    pub fn signal(&mut self, id: &str, signal: i32, all: bool) -> Result<(), ClientError> {
        self.expect_ok(&Request::Signal {
            id: id.into(),
            signal,
            all,
        })
    }

    pub fn resize(&mut self, id: &str, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.expect_ok(&Request::Resize {
            id: id.into(),
            rows,
            cols,
        })
    }

    pub fn close_stdin(&mut self, id: &str) -> Result<(), ClientError> {
        self.expect_ok(&Request::CloseStdin { id: id.into() })
    }

    pub fn pids(&mut self) -> Result<Vec<i32>, ClientError> {
        match self.call(&Request::Pids)? {
            Response::Pids { pids } => Ok(pids),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Configures the VM's network interface.
    pub fn network(&mut self, config: &agent_protocol::NetworkConfig) -> Result<(), ClientError> {
        self.expect_ok(&Request::Network {
            config: config.clone(),
        })
    }

    /// Gives the VM its own identity: `entropy` for its random pool, the host's wall
    /// clock now, and `hostname`.
    pub fn identity(
        &mut self,
        entropy: Vec<u8>,
        hostname: Option<&str>,
    ) -> Result<(), ClientError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.expect_ok(&Request::Identity {
            entropy,
            realtime_ns: i64::try_from(now.as_nanos()).unwrap_or(i64::MAX),
            hostname: hostname.map(str::to_string),
        })
    }

    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        self.expect_ok(&Request::Shutdown)
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // Closing ends the connection for every clone of the stream too: the agent sees
        // the host hang up.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// A process started with its stdio relayed; `finish` waits for it.
#[derive(Debug)]
pub struct RunningProcess {
    pub id: String,
    pub pid: i32,
    relay: Relay,
}

/// What a process is to the agent.
#[derive(Debug, Default, Clone)]
pub struct Launch {
    /// The VM's main process (the VM ends after it).
    pub init: bool,
    /// The container it creates (init only).
    pub container: Option<ContainerSpec>,
}

impl Launch {
    /// An extra process.
    pub fn extra() -> Self {
        Launch::default()
    }

    /// The VM's main process, without a container.
    pub fn init() -> Self {
        Launch {
            init: true,
            container: None,
        }
    }
}

/// Creates and starts process `id` with `io` as its stdio.
pub fn start_process(
    client: &AgentClient,
    control: &mut Control,
    id: &str,
    spec: ProcessSpec,
    io: HostIo,
    launch: Launch,
) -> Result<RunningProcess, ClientError> {
    control.create(id, spec, io.stdio(), launch.init, launch.container)?;
    let relay = Relay::attach(client, id, io)?;
    let pid = control.start(id)?;
    Ok(RunningProcess {
        id: id.to_string(),
        pid,
        relay,
    })
}

impl RunningProcess {
    /// Waits for the exit status, then for all output to be delivered.
    pub fn finish(self, control: &mut Control) -> Result<i32, ClientError> {
        let status = control.wait(&self.id)?;
        self.relay.finish();
        Ok(status)
    }
}
