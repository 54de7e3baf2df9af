//! A VM with a guest agent in it: boots the VM with its vsock device, waits for the agent's
//! ready call on host port 1025, and hands out an agent client. `finish` lets the VM end on
//! its own for a while and stops it otherwise, so a guest that halts without resetting
//! cannot keep the VMM alive.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{check_version, read_frame, Hello, AGENT_PORT, READY_PORT};
use vmm::devices::virtio::vsock::unix::VsockMuxer;
use vmm::devices::virtio::vsock::Vsock;
use vmm::{BuildError, HostProfile, RunningVm, VmBuilder, VmConfig, VmExit, VmHandle};

use crate::agent_client::{AgentClient, VsockDialer};

/// The guest's vsock context id.
pub const GUEST_CID: u64 = 3;
/// Name of the vsock socket in the sandbox directory.
pub const VSOCK_NAME: &str = "vsock.sock";

/// Errors booting a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("vsock device: {0}")]
    Vsock(String),
    #[error("virtio-fs share: {0}")]
    Share(String),
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
    vsock: PathBuf,
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
        Self::boot_with_share(config, &dir.join(VSOCK_NAME), None, ready_timeout)
    }

    /// Boots `config` with a vsock device at `vsock` and, with `share`, a virtio-fs device
    /// (tag [`crate::translate::SHARE_TAG`]) serving that directory; waits up to
    /// `ready_timeout` for the agent.
    pub fn boot_with_share(
        config: VmConfig,
        vsock: &Path,
        share: Option<&Path>,
        ready_timeout: Duration,
    ) -> Result<Self, SandboxError> {
        let ready_path = ready_socket(vsock);
        let ready = vmm::unix_path::bind(&ready_path).map_err(|source| SandboxError::Io {
            what: "binding",
            path: ready_path.clone(),
            source,
        })?;
        let result = Self::start(config, vsock, share, &ready, ready_timeout);
        let _ = std::fs::remove_file(&ready_path);
        result
    }

    fn start(
        config: VmConfig,
        vsock: &Path,
        share: Option<&Path>,
        ready: &UnixListener,
        timeout: Duration,
    ) -> Result<Self, SandboxError> {
        let muxer =
            VsockMuxer::new(GUEST_CID, vsock).map_err(|e| SandboxError::Vsock(e.to_string()))?;
        let device =
            Vsock::new(GUEST_CID, muxer).map_err(|e| SandboxError::Vsock(e.to_string()))?;
        let mut builder = VmBuilder::new(config, HostProfile::detect());
        builder.add_virtio_device(Arc::new(Mutex::new(device)));
        if let Some(dir) = share {
            let server = vmm::devices::virtio::fs::passthrough::share_server(dir)
                .map_err(|e| SandboxError::Share(e.to_string()))?;
            let fs = vmm::devices::virtio::fs::VirtioFs::new(crate::translate::SHARE_TAG, server)
                .map_err(|e| SandboxError::Share(e.to_string()))?;
            builder.add_virtio_device(Arc::new(Mutex::new(fs)));
        }
        let vm = builder.build()?.start()?;
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
            vsock: vsock.to_path_buf(),
            agent,
        })
    }

    /// The agent client.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// Control over the VM.
    pub fn handle(&self) -> VmHandle {
        self.vm.handle()
    }

    /// The vsock socket host programs can connect to.
    pub fn vsock_path(&self) -> &Path {
        &self.vsock
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
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SandboxError::NotReady(timeout));
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: vm.exit_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(SandboxError::BadReady(e.to_string()));
        }
        if fds[1].revents != 0 {
            return Err(SandboxError::EndedEarly(VmExit::Stopped));
        }
        if fds[0].revents != 0 {
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
