//! One command in a fresh VM whose root is the agent initramfs (`runvm vm-run`): the
//! shortest path through VM, vsock and agent, without any OCI bundle. The command is the
//! VM's main process; the VM ends after it.

use std::path::Path;
use std::time::Duration;

use agent_protocol::ProcessSpec;
use vmm::{VmConfig, VmExit};

use crate::agent_client::{start_process, ClientError, Launch};
use crate::relay::HostIo;
use crate::sandbox::{Sandbox, SandboxError};

/// How long the agent may take to come up (a cold boot on software KVM takes ~20 s).
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the VM may take to end after the process's status arrived.
const END_GRACE: Duration = Duration::from_secs(10);

/// Why the command did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum VmRunError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Agent(#[from] ClientError),
    #[error("the VM ended before the process did: {exit} ({cause})")]
    VmEnded { exit: VmExit, cause: ClientError },
    #[error("stdio: {0}")]
    Stdio(#[source] std::io::Error),
}

/// Boots `config` (its vsock socket in `dir`), runs `spec` with this process's stdio and
/// returns its status (127/126 when it cannot run, with the reason on stderr).
pub fn run_command(config: VmConfig, dir: &Path, spec: ProcessSpec) -> Result<i32, VmRunError> {
    let sandbox = Sandbox::boot(config, dir, READY_TIMEOUT)?;
    log::debug!("agent ready: {}", sandbox.agent);
    let client = sandbox.client().clone();
    let mut control = client.control()?;
    // If the VM dies, unblock whoever waits on the agent.
    let handle = sandbox.handle();
    let watched = control.try_clone_stream().map_err(VmRunError::Stdio)?;
    std::thread::spawn(move || {
        handle.wait_ended(None);
        let _ = watched.shutdown(std::net::Shutdown::Both);
    });
    let io = HostIo::inherited().map_err(VmRunError::Stdio)?;
    let outcome = start_process(&client, &mut control, "main", spec, io, Launch::init())
        .and_then(|p| p.finish(&mut control));
    drop(control);
    if outcome.is_err() {
        // The main process never ran to its end, so the agent will not end the VM itself.
        if let Ok(mut c) = client.control() {
            let _ = c.shutdown();
        }
    }
    let exit = sandbox.finish(END_GRACE);
    match outcome {
        Ok(status) => {
            if !exit.is_clean() {
                log::warn!("the VM ended badly after the process: {exit}");
            }
            Ok(status)
        }
        Err(ClientError::Exec { status, message }) => {
            eprintln!("runvm: {message}");
            Ok(status)
        }
        Err(cause) if !exit.is_clean() => Err(VmRunError::VmEnded { exit, cause }),
        Err(e) => Err(e.into()),
    }
}
