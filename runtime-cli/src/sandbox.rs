//! A VM with a guest agent in it: boots the VM with its vsock device and its network
//! device (without a backend until the container's network is attached), waits for the
//! agent's ready call on host port 1025, and hands out an agent client. `finish` lets the VM end on
//! its own for a while and stops it otherwise, so a guest that halts without resetting
//! cannot keep the VMM alive.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{check_version, read_frame, Hello, AGENT_PORT, READY_PORT};
use vmm::devices::virtio::net::{Net, NetAttach};
use vmm::devices::virtio::vsock::unix::VsockMuxer;
use vmm::devices::virtio::vsock::Vsock;
use vmm::{BuildError, HostProfile, RunningVm, VmBuilder, VmConfig, VmExit, VmHandle};

use crate::agent_client::{AgentClient, VsockDialer};

/// The guest's vsock context id.
pub const GUEST_CID: u64 = 3;
/// The guest interface's MAC until the container's is known (locally administered).
pub const BOOT_MAC: [u8; 6] = [0x02, 0x72, 0x76, 0x00, 0x00, 0x01];
/// Name of the vsock socket in the sandbox directory.
pub const VSOCK_NAME: &str = "vsock.sock";

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
        let profile = HostProfile::detect();
        Self::boot_with_share(config, profile, &vsock, None, ready_timeout, |_| {})
    }

    /// Boots `config` with a vsock device at `vsock` and, with `share`, a virtio-fs device
    /// (tag [`crate::translate::SHARE_TAG`]) serving that directory; waits up to
    /// `ready_timeout` for the agent. `on_running` gets a handle to the VM as soon as it
    /// runs (so that it can be stopped while it boots).
    pub fn boot_with_share(
        config: VmConfig,
        profile: HostProfile,
        vsock: &Path,
        share: Option<&Path>,
        ready_timeout: Duration,
        on_running: impl FnOnce(VmHandle),
    ) -> Result<Self, SandboxError> {
        let ready_path = ready_socket(vsock);
        let ready = vmm::unix_path::bind(&ready_path).map_err(|source| SandboxError::Io {
            what: "binding",
            path: ready_path.clone(),
            source,
        })?;
        let vm = (config, profile);
        let result = Self::start(vm, vsock, share, &ready, ready_timeout, on_running);
        let _ = std::fs::remove_file(&ready_path);
        result
    }

    fn start(
        (config, profile): (VmConfig, HostProfile),
        vsock: &Path,
        share: Option<&Path>,
        ready: &UnixListener,
        timeout: Duration,
        on_running: impl FnOnce(VmHandle),
    ) -> Result<Self, SandboxError> {
        let muxer = VsockMuxer::new(GUEST_CID, vsock)?;
        let device = Vsock::new(GUEST_CID, muxer).map_err(SandboxError::VsockDevice)?;
        let mut builder = VmBuilder::new(config, profile);
        builder.add_virtio_device(Arc::new(Mutex::new(device)));
        let net = Net::new(BOOT_MAC).map_err(SandboxError::NetDevice)?;
        let attach = net.attach_handle();
        builder.add_virtio_device(Arc::new(Mutex::new(net)));
        if let Some(dir) = share {
            let server = vmm::devices::virtio::fs::passthrough::share_server(dir)?;
            let fs = vmm::devices::virtio::fs::VirtioFs::new(crate::translate::SHARE_TAG, server)?;
            builder.add_virtio_device(Arc::new(Mutex::new(fs)));
        }
        let vm = builder.build()?.start()?;
        on_running(vm.handle());
        let agent = match wait_ready(ready, &vm, timeout) {
            Ok(a) => a,
            Err(e) => {
                vm.handle().stop();
                let exit = vm.wait();
                return Err(match e {
                    SandboxError::EndedEarly(_) => SandboxError::EndedEarly(exit),
                    e => e,
                });
            }
        };
        let client = AgentClient::new(Arc::new(VsockDialer {
            socket: vsock.to_path_buf(),
            port: AGENT_PORT,
        }));
        Ok(Sandbox {
            vm,
            client,
            net: attach,
            agent,
        })
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
