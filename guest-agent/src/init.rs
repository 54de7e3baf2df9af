//! PID-1 duties in the VM: the basic mounts, telling the host the agent is ready, and
//! ending the VM.

use std::path::Path;
use std::sync::Arc;

use agent_protocol::{write_frame, Hello, AGENT_PORT, PROTOCOL_VERSION, READY_PORT};
use nix::mount::{mount, MsFlags};

use crate::conn::{connect_host, Listener};
use crate::power::Role;
use crate::process::Processes;
use crate::server::ServeError;
use crate::{reaper, server};

/// Why the agent could not come up as the VM's init.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("blocking SIGCHLD: {0}")]
    Signals(#[source] nix::Error),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("reaper thread: {0}")]
    Reaper(#[source] std::io::Error),
    #[error("listening on vsock port {AGENT_PORT}: {0}")]
    Listen(#[source] std::io::Error),
    #[error("connecting to the host's ready port: {0}")]
    ReadyConnect(#[source] std::io::Error),
    #[error("sending ready: {0}")]
    ReadySend(#[source] agent_protocol::FrameError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Sys { what, source }
}

fn io(what: &'static str, path: &'static str) -> impl FnOnce(std::io::Error) -> InitError {
    move |source| InitError::Io { what, path, source }
}

/// Mounts what every Linux program expects to find.
fn mount_basics() -> Result<(), InitError> {
    let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    let mounts: [(&str, &str, MsFlags, Option<&str>); 7] = [
        ("proc", "/proc", nosuid_noexec_nodev, None),
        ("sysfs", "/sys", nosuid_noexec_nodev, None),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755")),
        (
            "devpts",
            "/dev/pts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (fstype, target, flags, data) in mounts {
        std::fs::create_dir_all(target).map_err(io("creating", target))?;
        mount(Some(fstype), target, Some(fstype), flags, data)
            .map_err(sys(format!("mounting {fstype} on {target}")))?;
    }
    // /dev/ptmx must be the devpts instance's multiplexer.
    let _ = std::fs::remove_file("/dev/ptmx");
    std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx").map_err(io("linking", "/dev/ptmx"))?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !Path::new(link).exists() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    Ok(())
}

/// The initramfs root cannot be pivoted away from: it has no parent mount. Moving a bind
/// mount of it over `/` and chrooting into that gives the root a parent, so containers can
/// `pivot_root` out of it.
fn reroot() -> Result<(), InitError> {
    const DIR: &str = "/.runvm-root";
    std::fs::create_dir_all(DIR).map_err(io("creating", DIR))?;
    mount(Some("/"), DIR, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(sys("binding /"))?;
    nix::unistd::chdir(DIR).map_err(sys(format!("chdir {DIR}")))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys("moving the root"))?;
    nix::unistd::chroot(".").map_err(sys("chroot"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    Ok(())
}

/// Tells the host the agent listens: one hello on the host's ready port.
fn notify_ready() -> Result<(), InitError> {
    let mut s = connect_host(READY_PORT).map_err(InitError::ReadyConnect)?;
    let ready = Hello::Ready {
        version: PROTOCOL_VERSION,
        agent: format!("runvm-agent {}", env!("CARGO_PKG_VERSION")),
    };
    write_frame(&mut s, &ready).map_err(InitError::ReadySend)
}

/// Runs the agent as the VM's init.
pub fn run_as_init() -> Result<(), InitError> {
    reaper::block_sigchld().map_err(InitError::Signals)?;
    crate::spawn::set_profile_env();
    reroot()?;
    mount_basics()?;
    if let Err(e) = crate::network::init() {
        // Containers can still run; only loopback is missing.
        eprintln!("runvm-agent: bringing up loopback: {e}");
    }
    let procs = Arc::new(Processes::new());
    let p = procs.clone();
    reaper::spawn(move |pid, status| p.reaped(pid, status)).map_err(InitError::Reaper)?;
    let listener = Listener::vsock(AGENT_PORT).map_err(InitError::Listen)?;
    notify_ready()?;
    Ok(server::serve(listener, procs, Role::Init)?)
}
