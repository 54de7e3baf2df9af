//! Containers. The init process gets its own mount, UTS, IPC and PID namespaces and the
//! container's root, prepared by a helper (this binary re-executed as `container-init`)
//! that then waits, blocked before exec, until the start; later processes join the same
//! namespaces and root through the same helper.

pub mod mounts;
pub mod setup;

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio as StdStdio};

use agent_protocol::{ContainerSpec, ProcessSpec};
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};

use crate::spawn::{fail, SpawnError};

/// Descriptor number of the helper's control socket.
pub const HELPER_FD: i32 = 3;
/// Where an agent in a VM mounts the share.
pub const SHARE_MOUNT: &str = "/run/runvm/share";

/// Agent -> helper.
#[derive(Debug, Serialize, Deserialize)]
pub struct HelperSetup {
    /// Build this container (the init process)...
    pub container: Option<ContainerSpec>,
    /// ...or join the one whose init has this pid.
    pub join: Option<i32>,
    pub process: ProcessSpec,
    /// The container's seccomp profile (every process of the container gets it).
    pub seccomp: Option<agent_protocol::Seccomp>,
    /// Where the share is visible to the agent.
    pub share_root: String,
    /// The host profile's environment (see `spawn::set_profile_env`).
    pub profile_env: Vec<(String, String)>,
}

/// Helper -> agent.
#[derive(Debug, Serialize, Deserialize)]
pub enum HelperReport {
    /// Prepared and waiting for the start; a terminal master comes with it when the
    /// process has a terminal.
    Ready,
    /// In its new user namespace: the agent writes the id maps (only a process outside
    /// the namespace can), then sends one byte.
    MapIds,
    /// Preparing or exec failed; `status` stands for the process.
    Failed { status: i32, message: String },
}

/// A prepared process, blocked before exec.
#[derive(Debug)]
pub struct Helper {
    pub pid: i32,
    sock: UnixStream,
    /// The terminal master, when the process has a terminal.
    pub pty: Option<File>,
}

/// The process's standard streams as the helper inherits them.
#[derive(Debug, Default)]
pub struct HelperStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

fn stdio_of(fd: Option<OwnedFd>) -> StdStdio {
    fd.map_or_else(StdStdio::null, StdStdio::from)
}

/// Starts a helper for `setup` and waits until it is ready (or failed). The helper runs in
/// a new PID namespace (an init) or in the one of the container it joins.
pub fn prepare(setup: HelperSetup, stdio: HelperStdio) -> Result<Helper, SpawnError> {
    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| fail(1, format!("socketpair: {e}")))?;
    let pid = fork_helper(setup.join, stdio, theirs)?;
    let sock = UnixStream::from(ours);
    // A helper that hangs (a file system that never answers) fails the create.
    let _ = sock.set_read_timeout(Some(PREPARE_TIMEOUT));
    setup::send_msg(&sock, &setup, None)
        .map_err(|e| fail(1, format!("sending setup to the helper: {e}")))?;
    let userns = setup
        .container
        .as_ref()
        .and_then(|c| c.user_namespace.as_ref());
    let pty = await_ready(pid, &sock, userns)?;
    let _ = sock.set_read_timeout(None);
    Ok(Helper { pid, sock, pty })
}

/// Starts `runvm-agent container-init` in a new PID namespace (or `join`'s), with the
/// helper's end of the socket pair at [`HELPER_FD`]; returns its pid.
fn fork_helper(
    join: Option<i32>,
    stdio: HelperStdio,
    theirs: std::os::fd::OwnedFd,
) -> Result<i32, SpawnError> {
    // Namespaces for children are per thread: a short-lived thread forks the helper.
    let spawned = std::thread::spawn(move || -> Result<u32, SpawnError> {
        match join {
            None => nix::sched::unshare(CloneFlags::CLONE_NEWPID)
                .map_err(|e| fail(1, format!("new PID namespace: {e}")))?,
            Some(pid) => {
                let ns = File::open(format!("/proc/{pid}/ns/pid"))
                    .map_err(|e| fail(1, format!("container init {pid} is gone: {e}")))?;
                nix::sched::setns(ns, CloneFlags::CLONE_NEWPID)
                    .map_err(|e| fail(1, format!("joining PID namespace: {e}")))?;
            }
        }
        let raw = theirs.as_raw_fd();
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("container-init")
            .stdin(stdio_of(stdio.stdin))
            .stdout(stdio_of(stdio.stdout))
            .stderr(stdio_of(stdio.stderr));
        let child_setup = move || {
            // SAFETY: `raw` is our end of the socket pair, open in this child until exec.
            let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
            if raw == HELPER_FD {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                let flags = nix::fcntl::FdFlag::empty();
                nix::fcntl::fcntl(sock, nix::fcntl::FcntlArg::F_SETFD(flags))?;
            } else {
                // SAFETY: HELPER_FD belongs to nothing else in this child and must stay
                // open across exec: the returned owner is forgotten, not dropped.
                std::mem::forget(unsafe { nix::unistd::dup2_raw(sock, HELPER_FD) }?);
            }
            Ok(())
        };
        // SAFETY: between fork and exec the hook only changes descriptors of the child.
        unsafe { cmd.pre_exec(child_setup) };
        let child = cmd
            .spawn()
            .map_err(|e| fail(1, format!("starting the container helper: {e}")))?;
        drop(theirs);
        Ok(child.id())
    });
    let pid = spawned
        .join()
        .map_err(|_| fail(1, "container helper thread panicked".into()))??;
    Ok(pid as i32)
}

/// Serves the helper's reports until it is ready (its terminal, if it made one), writing
/// the id maps of `userns` when it asks.
fn await_ready(
    pid: i32,
    sock: &UnixStream,
    userns: Option<&agent_protocol::UserNamespace>,
) -> Result<Option<File>, SpawnError> {
    loop {
        match setup::recv_msg::<HelperReport>(sock) {
            Ok(Some((HelperReport::Ready, pty))) => return Ok(pty),
            Ok(Some((HelperReport::MapIds, _))) => {
                let Some(ns) = userns else {
                    return Err(fail(
                        1,
                        "the helper asked for id maps it has none of".into(),
                    ));
                };
                write_id_maps(pid, ns)?;
                use std::io::Write;
                (&*sock)
                    .write_all(&[1])
                    .map_err(|e| fail(1, format!("answering the helper: {e}")))?;
            }
            Ok(Some((HelperReport::Failed { status, message }, _))) => {
                return Err(fail(status, message))
            }
            Ok(None) => {
                return Err(fail(
                    1,
                    "the container helper exited before it was ready".into(),
                ))
            }
            Err(e) => return Err(fail(1, format!("reading the container helper: {e}"))),
        }
    }
}

/// How long a helper may take to prepare the container.
const PREPARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Writes the uid and gid maps of the user namespace the helper `pid` just entered.
fn write_id_maps(pid: i32, ns: &agent_protocol::UserNamespace) -> Result<(), SpawnError> {
    let lines = |maps: &[agent_protocol::IdMapping]| {
        maps.iter()
            .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size))
            .collect::<String>()
    };
    for (file, maps) in [("uid_map", &ns.uid_mappings), ("gid_map", &ns.gid_mappings)] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, lines(maps))
            .map_err(|e| fail(1, format!("writing the container's {file}: {e}")))?;
    }
    Ok(())
}

impl Helper {
    /// Lets the process exec. Returns once it did (or why it could not).
    pub fn start(self) -> Result<(), SpawnError> {
        use std::io::Write;
        (&self.sock)
            .write_all(&[1])
            .map_err(|e| fail(1, format!("starting the helper: {e}")))?;
        match setup::recv_msg::<HelperReport>(&self.sock) {
            // End of stream: the socket closed on exec.
            Ok(None) => Ok(()),
            Ok(Some((HelperReport::Failed { status, message }, _))) => Err(fail(status, message)),
            Ok(Some((HelperReport::Ready | HelperReport::MapIds, _))) => {
                Err(fail(1, "unexpected report from the helper".into()))
            }
            Err(e) => Err(fail(1, format!("reading the helper: {e}"))),
        }
    }
}

/// Why the container's share cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("share directory {0} does not exist")]
    NoDirectory(String),
    #[error("creating {SHARE_MOUNT}: {0}")]
    MountPoint(#[source] std::io::Error),
    #[error("mounting virtio-fs share {tag:?}: {source}")]
    Mount {
        tag: String,
        #[source]
        source: nix::Error,
    },
}

/// Makes the share visible to the agent and returns where: a virtio-fs share is mounted
/// (once) at [`SHARE_MOUNT`]; a directory share is used where it is.
pub fn mount_share(share: &agent_protocol::Share) -> Result<String, ShareError> {
    match share {
        agent_protocol::Share::Directory { path } => {
            if std::path::Path::new(path).is_dir() {
                Ok(path.clone())
            } else {
                Err(ShareError::NoDirectory(path.clone()))
            }
        }
        agent_protocol::Share::Virtiofs { tag } => {
            let mounted = procfs::process::Process::myself()
                .and_then(|p| p.mountinfo())
                .map(|m| {
                    m.into_iter()
                        .any(|i| i.mount_point == std::path::Path::new(SHARE_MOUNT))
                })
                .unwrap_or(false);
            if !mounted {
                std::fs::create_dir_all(SHARE_MOUNT).map_err(ShareError::MountPoint)?;
                nix::mount::mount(
                    Some(tag.as_str()),
                    SHARE_MOUNT,
                    Some("virtiofs"),
                    nix::mount::MsFlags::empty(),
                    None::<&str>,
                )
                .map_err(|source| ShareError::Mount {
                    tag: tag.clone(),
                    source,
                })?;
            }
            Ok(SHARE_MOUNT.to_string())
        }
    }
}
