//! A VM with a guest agent in it: boots the VM with its vsock device and its network
//! device (without a backend until the container's network is attached), waits for the
//! agent's ready call on host port 1025, and hands out an agent client. `finish` lets the VM end on
//! its own for a while and stops it otherwise, so a guest that halts without resetting
//! cannot keep the VMM alive.
//!
//! Instead of booting, a sandbox can resume a template: a snapshot of a VM of the same
//! shape whose agent was ready and idle. Its agent is then already listening (the vsock
//! device resets the connections the snapshot had), so there is no ready call to wait
//! for. A template that cannot be restored, or whose VM does not take its identity in
//! time, is logged and the VM boots instead. `adopt` gives either VM its own identity
//! (randomness, clock, hostname).

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{check_version, read_frame, Hello, AGENT_PORT, READY_PORT};
use vmm::devices::virtio::fs::FS_DEVICE_ID;
use vmm::devices::virtio::net::{Net, NetAttach, NET_DEVICE_ID};
use vmm::devices::virtio::vsock::unix::VsockMuxer;
use vmm::devices::virtio::vsock::{Vsock, VSOCK_DEVICE_ID};
use vmm::snapshot::{Shape, Snapshot, SnapshotError};
use vmm::{BuildError, HostProfile, RunningVm, VmBuilder, VmConfig, VmExit, VmHandle};

use crate::agent_client::{AgentClient, VsockDialer};

/// The guest's vsock context id.
pub const GUEST_CID: u64 = 3;
/// The guest interface's MAC until the container's is known (locally administered).
pub const BOOT_MAC: [u8; 6] = [0x02, 0x72, 0x76, 0x00, 0x00, 0x01];
/// Name of the vsock socket in the sandbox directory.
pub const VSOCK_NAME: &str = "vsock.sock";
/// Bytes of host randomness a VM's random pool gets.
const ENTROPY_BYTES: usize = 64;

/// The shape of a sandbox VM of `config` (with a share or not) on a host with `profile`:
/// what a template must have been made with to serve it.
pub fn shape(config: &VmConfig, profile: &HostProfile, share: bool) -> std::io::Result<Shape> {
    let devices: &[u32] = if share {
        &[VSOCK_DEVICE_ID, NET_DEVICE_ID, FS_DEVICE_ID]
    } else {
        &[VSOCK_DEVICE_ID, NET_DEVICE_ID]
    };
    Shape::of(config, profile, devices)
}

/// What to start a sandbox VM from.
#[derive(Debug)]
pub struct Launch<'a> {
    pub config: VmConfig,
    pub profile: HostProfile,
    /// The vsock device's socket.
    pub vsock: &'a Path,
    /// The directory a virtio-fs device serves (tag [`crate::translate::SHARE_TAG`]).
    pub share: Option<&'a Path>,
    /// How long a booting VM's agent may take to be ready.
    pub ready_timeout: Duration,
    /// A template to restore instead of booting.
    pub template: Option<Snapshot>,
    /// Give the VM its identity (see [`Sandbox::adopt`]) with this hostname, before
    /// anything else reaches its agent; a restored VM that cannot take it is stopped and
    /// the VM boots instead.
    pub identity: Option<Option<String>>,
}

/// How long a VM's agent may take to answer the identity call.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors booting a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("vsock device: {0}")]
    Vsock(#[from] vmm::devices::virtio::vsock::unix::MuxerError),
    #[error("vsock device: {0}")]
    VsockDevice(#[source] std::io::Error),
    #[error("network device: {0}")]
    NetDevice(#[source] std::io::Error),
    #[error("virtio-fs share: {0}")]
    Share(#[from] vmm::devices::virtio::fs::passthrough::ShareError),
    #[error("virtio-fs share: {0}")]
    ShareDevice(#[from] vmm::devices::virtio::fs::device::FsDeviceError),
    #[error("the VM ended before its agent was ready: {0}")]
    EndedEarly(VmExit),
    #[error("the guest agent was not ready after {0:?}")]
    NotReady(Duration),
    #[error("the guest agent's ready call was malformed: {0}")]
    BadReady(String),
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("giving the VM its identity: {0}")]
    Identity(#[source] crate::agent_client::ClientError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running VM whose agent answered.
#[derive(Debug)]
pub struct Sandbox {
    vm: RunningVm,
    client: AgentClient,
    net: NetAttach,
    pub agent: String,
    restored: bool,
    template_failure: Option<String>,
}

fn ready_socket(vsock: &Path) -> PathBuf {
    PathBuf::from(format!("{}_{READY_PORT}", vsock.display()))
}

impl Sandbox {
    /// Boots `config` with a vsock device whose socket is `<dir>/vsock.sock`, and waits up
    /// to `ready_timeout` for the agent.
    pub fn boot(
        config: VmConfig,
        dir: &Path,
        ready_timeout: Duration,
    ) -> Result<Self, SandboxError> {
        let vsock = dir.join(VSOCK_NAME);
        let launch = Launch {
            config,
            profile: HostProfile::detect(),
            vsock: &vsock,
            share: None,
            ready_timeout,
            template: None,
            identity: None,
        };
        Self::launch(launch, |_| {})
    }

    /// Starts the VM `launch` describes: restores its template, or boots and waits for
    /// the agent. `on_running` gets a handle to the VM as soon as it runs (so that it can
    /// be stopped while it boots).
    pub fn launch(
        mut launch: Launch<'_>,
        on_running: impl FnOnce(VmHandle),
    ) -> Result<Self, SandboxError> {
        let mut template_failure = None;
        if let Some(template) = launch.template.take() {
            let dir = template.dir.clone();
            match Self::restore(&launch, template) {
                Ok(mut sandbox) => {
                    on_running(sandbox.handle());
                    sandbox.restored = true;
                    return Ok(sandbox);
                }
                Err(e) => {
                    log::warn!(
                        "template {} was not restored ({e}): booting instead",
                        dir.display()
                    );
                    template_failure = Some(e.to_string());
                }
            }
        }
        let mut sandbox = Self::boot_and_wait(&launch, on_running)?;
        if let Some(hostname) = &launch.identity {
            if let Err(e) = sandbox.adopt(hostname.as_deref()) {
                let _ = sandbox.finish(Duration::ZERO);
                return Err(e);
            }
        }
        sandbox.template_failure = template_failure;
        Ok(sandbox)
    }

    /// A VM restored from `template` whose agent took its identity (when asked for); a
    /// VM that does not answer in time is stopped.
    fn restore(launch: &Launch<'_>, template: Snapshot) -> Result<Self, SandboxError> {
        let dir = template.dir.clone();
        let started = Instant::now();
        let (vm, attach) = Self::start(launch, Some(template))?;
        let running = started.elapsed();
        let sandbox = Self::with_agent(vm, attach, launch.vsock, "restored".into());
        if let Some(hostname) = &launch.identity {
            if let Err(e) = sandbox.adopt(hostname.as_deref()) {
                let _ = sandbox.finish(Duration::ZERO);
                return Err(e);
            }
        }
        log::info!(
            "VM restored from template {} (running after {} ms, its identity taken {} ms later)",
            dir.display(),
            running.as_millis(),
            (started.elapsed() - running).as_millis()
        );
        Ok(sandbox)
    }

    /// A booted VM whose agent called in.
    fn boot_and_wait(
        launch: &Launch<'_>,
        on_running: impl FnOnce(VmHandle),
    ) -> Result<Self, SandboxError> {
        let ready_path = ready_socket(launch.vsock);
        let ready = vmm::unix_path::bind(&ready_path).map_err(|source| SandboxError::Io {
            what: "binding",
            path: ready_path.clone(),
            source,
        })?;
        let result = Self::start(launch, None).and_then(|(vm, attach)| {
            on_running(vm.handle());
            match wait_ready(&ready, &vm, launch.ready_timeout) {
                Ok(agent) => Ok(Self::with_agent(vm, attach, launch.vsock, agent)),
                Err(e) => {
                    vm.handle().stop();
                    let exit = vm.wait();
                    Err(match e {
                        SandboxError::EndedEarly(_) => SandboxError::EndedEarly(exit),
                        e => e,
                    })
                }
            }
        });
        let _ = std::fs::remove_file(&ready_path);
        result
    }

    /// Whether the VM was restored from a template; why a template given was not used.
    pub fn origin(&self) -> (bool, Option<&str>) {
        (self.restored, self.template_failure.as_deref())
    }

    fn with_agent(vm: RunningVm, net: NetAttach, vsock: &Path, agent: String) -> Self {
        let client = AgentClient::new(Arc::new(VsockDialer {
            socket: vsock.to_path_buf(),
            port: AGENT_PORT,
        }));
        Sandbox {
            vm,
            client,
            net,
            agent,
            restored: false,
            template_failure: None,
        }
    }

    /// The VM with its devices, booted or restored from `template`, running.
    fn start(
        launch: &Launch<'_>,
        template: Option<Snapshot>,
    ) -> Result<(RunningVm, NetAttach), SandboxError> {
        let muxer = VsockMuxer::new(GUEST_CID, launch.vsock)?;
        let device = Vsock::new(GUEST_CID, muxer).map_err(SandboxError::VsockDevice)?;
        let mut builder = VmBuilder::new(launch.config.clone(), launch.profile);
        builder.add_virtio_device(Arc::new(Mutex::new(device)));
        let net = Net::new(BOOT_MAC).map_err(SandboxError::NetDevice)?;
        let attach = net.attach_handle();
        builder.add_virtio_device(Arc::new(Mutex::new(net)));
        if let Some(dir) = launch.share {
            let server = vmm::devices::virtio::fs::passthrough::share_server(dir)?;
            let fs = vmm::devices::virtio::fs::VirtioFs::new(crate::translate::SHARE_TAG, server)?;
            builder.add_virtio_device(Arc::new(Mutex::new(fs)));
        }
        let vmm = match template {
            Some(t) => builder.restore(t)?,
            None => builder.build()?,
        };
        Ok((vmm.start()?, attach))
    }

    /// Gives the VM its own identity before a container runs in it: fresh host
    /// randomness for its random pool, the host's wall clock, and `hostname`.
    fn adopt(&self, hostname: Option<&str>) -> Result<(), SandboxError> {
        let mut entropy = vec![0u8; ENTROPY_BYTES];
        // getrandom(2): a jailed VMM has no /dev/urandom.
        vmm::snapshot::fill_random(&mut entropy).map_err(|source| SandboxError::Io {
            what: "reading randomness for",
            path: PathBuf::from("the guest"),
            source,
        })?;
        let mut control = self
            .client
            .control_within(IDENTITY_TIMEOUT)
            .map_err(SandboxError::Identity)?;
        control
            .identity(entropy, hostname)
            .map_err(SandboxError::Identity)
    }

    /// Saves the VM, as one of `shape`, into `dir`; the VM stays paused.
    pub fn snapshot(&self, dir: &Path, shape: &Shape) -> Result<(), SandboxError> {
        Ok(self.vm.snapshot(dir, shape)?)
    }

    /// The agent client.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// Attaches the network device's backend.
    pub fn net(&self) -> NetAttach {
        self.net.clone()
    }

    /// Control over the VM.
    pub fn handle(&self) -> VmHandle {
        self.vm.handle()
    }

    /// Gives the VM `grace` to end by itself, stops it otherwise, and returns why it ended.
    pub fn finish(self, grace: Duration) -> VmExit {
        if !self.vm.ended_within(grace) {
            log::warn!("the VM did not end within {grace:?} of its work: stopping it");
            self.vm.handle().stop();
        }
        self.vm.wait()
    }
}

/// Waits for the agent's `Hello::Ready` on the ready socket, or for the VM's end.
fn wait_ready(
    listener: &UnixListener,
    vm: &RunningVm,
    timeout: Duration,
) -> Result<String, SandboxError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SandboxError::NotReady(timeout));
        }
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(vm.exit_fd(), PollFlags::POLLIN),
        ];
        match poll(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(SandboxError::BadReady(e.to_string())),
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[1]) {
            return Err(SandboxError::EndedEarly(VmExit::Stopped));
        }
        if ready(&fds[0]) {
            let (mut s, _) = listener
                .accept()
                .map_err(|e| SandboxError::BadReady(e.to_string()))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok();
            return match read_frame::<_, Hello>(&mut s) {
                Ok(Hello::Ready { version, agent }) => {
                    check_version(version).map_err(SandboxError::BadReady)?;
                    Ok(agent)
                }
                Ok(other) => Err(SandboxError::BadReady(format!("{other:?}"))),
                Err(e) => Err(SandboxError::BadReady(e.to_string())),
            };
        }
    }
}
