//! PID-1 duties in the VM: the basic mounts, telling the host the agent is ready, and
//! ending the VM.

use std::path::Path;
use std::sync::Arc;

use agent_protocol::{write_frame, Hello, AGENT_PORT, PROTOCOL_VERSION, READY_PORT};
use nix::mount::{mount, MsFlags};

use crate::conn::{connect_host, Listener};
use crate::process::Processes;
use crate::{reaper, server};

/// Mounts what every Linux program expects to find.
fn mount_basics() -> Result<(), String> {
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
        std::fs::create_dir_all(target).map_err(|e| format!("creating {target}: {e}"))?;
        mount(Some(fstype), target, Some(fstype), flags, data)
            .map_err(|e| format!("mounting {fstype} on {target}: {e}"))?;
    }
    // /dev/ptmx must be the devpts instance's multiplexer.
    let _ = std::fs::remove_file("/dev/ptmx");
    std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx").map_err(|e| format!("/dev/ptmx: {e}"))?;
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
fn reroot() -> Result<(), String> {
    let dir = "/.runvm-root";
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {dir}: {e}"))?;
    mount(Some("/"), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| format!("binding /: {e}"))?;
    nix::unistd::chdir(dir).map_err(|e| format!("chdir {dir}: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("moving the root: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// Tells the host the agent listens: one hello on the host's ready port.
fn notify_ready() -> Result<(), String> {
    let mut s = connect_host(READY_PORT)
        .map_err(|e| format!("connecting to the host's ready port: {e}"))?;
    write_frame(
        &mut s,
        &Hello::Ready {
            version: PROTOCOL_VERSION,
            agent: format!("runvm-agent {}", env!("CARGO_PKG_VERSION")),
        },
    )
    .map_err(|e| format!("sending ready: {e}"))
}

/// Runs the agent as the VM's init.
pub fn run_as_init() -> Result<(), String> {
    reaper::block_sigchld().map_err(|e| format!("blocking SIGCHLD: {e}"))?;
    crate::spawn::set_profile_env();
    reroot()?;
    mount_basics()?;
    let procs = Arc::new(Processes::new());
    let p = procs.clone();
    reaper::spawn(move |pid, status| p.reaped(pid, status)).map_err(|e| format!("reaper: {e}"))?;
    let listener = Listener::vsock(AGENT_PORT)
        .map_err(|e| format!("listening on vsock port {AGENT_PORT}: {e}"))?;
    notify_ready()?;
    server::serve(listener, procs, server::Role::Init)
}

/// Ends the VM: file systems synced, then a reboot, which runvm treats as the VM's end.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Not reached unless reboot failed; PID 1 must not exit.
    loop {
        std::thread::park();
    }
}
