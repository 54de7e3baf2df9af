//! The helper process (`runvm-agent container-init`): the agent starts it in the
//! container's PID namespace with the process's stdio, and sends it the container and
//! process over descriptor 3. It builds or joins the container's namespaces and root,
//! allocates the terminal there, reports ready, waits for the start, applies the process
//! attributes and execs the process, which then is the container's init (or an exec'd
//! process). An exec that fails is reported with its status before the helper exits.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use agent_protocol::{read_frame, write_frame};

use nix::sched::CloneFlags;

use super::{mounts, HelperReport, HelperSetup, HELPER_FD};
use crate::confine::Confinement;
use crate::spawn::{self, SpawnError};

fn fail(status: i32, message: String) -> SpawnError {
    spawn::fail(status, message)
}

/// Joins the namespaces of the container whose init is `pid` (uts, ipc, then mount,
/// which also moves us into its root). Returns its user namespace when it has one of its
/// own, to join last: once in it, namespaces owned by the agent's could not be joined.
/// Every namespace is opened first: inside the container's mount namespace, /proc is
/// the container's, where `pid` means something else.
fn join(pid: i32) -> Result<Option<File>, SpawnError> {
    let open = |ns: &str| {
        File::open(format!("/proc/{pid}/ns/{ns}"))
            .map_err(|e| fail(1, format!("container init {pid} is gone ({ns}: {e})")))
    };
    let files = [
        (open("uts")?, CloneFlags::CLONE_NEWUTS),
        (open("ipc")?, CloneFlags::CLONE_NEWIPC),
        (open("mnt")?, CloneFlags::CLONE_NEWNS),
    ];
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/user"));
    let ours = std::fs::read_link("/proc/self/ns/user");
    let user = match (theirs, ours) {
        (Ok(t), Ok(o)) if t != o => Some(open("user")?),
        _ => None,
    };
    for (f, kind) in files {
        nix::sched::setns(f, kind).map_err(|e| fail(1, format!("joining {kind:?}: {e}")))?;
    }
    Ok(user)
}

/// Joins the container's user namespace (from [`join`]) and becomes its root.
fn join_user(ns: File) -> Result<(), SpawnError> {
    nix::sched::setns(ns, CloneFlags::CLONE_NEWUSER)
        .map_err(|e| fail(1, format!("joining the user namespace: {e}")))?;
    become_root_in_namespace()
}

/// In a user namespace whose maps are written: become its root (the creator has every
/// capability in it, so it may).
fn become_root_in_namespace() -> Result<(), SpawnError> {
    let root_g = nix::unistd::Gid::from_raw(0);
    let root_u = nix::unistd::Uid::from_raw(0);
    nix::unistd::setresgid(root_g, root_g, root_g)
        .and_then(|()| nix::unistd::setresuid(root_u, root_u, root_u))
        .map_err(|e| {
            fail(
                1,
                format!("becoming root in the user namespace (is 0 mapped?): {e}"),
            )
        })
}

/// Enters a new user namespace and waits until the agent wrote its id maps.
fn enter_user_namespace(sock: &UnixStream) -> Result<(), SpawnError> {
    nix::sched::unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(|e| fail(1, format!("new user namespace: {e}")))?;
    send_msg(sock, &HelperReport::MapIds, None)
        .map_err(|e| fail(1, format!("asking for id maps: {e}")))?;
    let mut b = [0u8; 1];
    match (&*sock).read(&mut b) {
        Ok(1) => become_root_in_namespace(),
        _ => Err(fail(1, "the agent did not write the id maps".into())),
    }
}

/// Applies `linux.sysctl` (in the container's namespaces; the guest kernel is its own).
fn apply_sysctl(sysctl: &std::collections::BTreeMap<String, String>) -> Result<(), SpawnError> {
    for (key, value) in sysctl {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        if !path.exists() {
            return Err(fail(
                1,
                format!("sysctl {key} does not exist in the guest kernel"),
            ));
        }
        std::fs::write(&path, value).map_err(|e| fail(1, format!("sysctl {key}={value}: {e}")))?;
    }
    Ok(())
}

/// Opens a terminal of the container's devpts and makes it our controlling terminal on
/// 0, 1 and 2. Returns the master, for the agent.
fn terminal(size: Option<agent_protocol::ConsoleSize>) -> Result<OwnedFd, SpawnError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: nix::Error| fail(1, format!("{what}: {e}"))
    };
    // Opened close-on-exec: the master is for the agent, not the process.
    let flags =
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC;
    let master =
        nix::pty::posix_openpt(flags).map_err(err("opening /dev/ptmx in the container"))?;
    nix::pty::grantpt(&master).map_err(err("grantpt"))?;
    nix::pty::unlockpt(&master).map_err(err("unlockpt"))?;
    let name = nix::pty::ptsname_r(&master).map_err(err("ptsname"))?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&name)
        .map_err(|e| fail(1, format!("opening {name}: {e}")))?;
    if let Some(s) = size {
        let ws = rustix::termios::Winsize {
            ws_row: s.height,
            ws_col: s.width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let _ = rustix::termios::tcsetwinsize(&slave, ws);
    }
    nix::unistd::dup2_stdin(&slave).map_err(err("dup2"))?;
    nix::unistd::dup2_stdout(&slave).map_err(err("dup2"))?;
    nix::unistd::dup2_stderr(&slave).map_err(err("dup2"))?;
    // We lead a new session: stdin, the terminal, becomes its controlling terminal.
    rustix::process::ioctl_tiocsctty(std::io::stdin())
        .map_err(|e| fail(1, format!("TIOCSCTTY: {e}")))?;
    Ok(master.into())
}

/// Builds the container: namespaces, sysctls, the root and its mounts, the hostname.
fn build(spec: &agent_protocol::ContainerSpec, share_root: &str) -> Result<(), SpawnError> {
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC,
    )
    .map_err(|e| fail(1, format!("unshare: {e}")))?;
    apply_sysctl(&spec.sysctl)?;
    let share = Path::new(share_root);
    let mount_err = |e: mounts::MountError| fail(1, agent_protocol::error_line(&e));
    mounts::build_root(spec, share).map_err(mount_err)?;
    mounts::enter_root(spec.no_pivot).map_err(mount_err)?;
    mounts::set_root_propagation(spec.rootfs_propagation.as_deref()).map_err(mount_err)?;
    mounts::finish_root(spec).map_err(mount_err)?;
    if let Some(h) = &spec.hostname {
        nix::unistd::sethostname(h).map_err(|e| fail(1, format!("hostname {h:?}: {e}")))?;
    }
    Ok(())
}

/// Everything before the start: namespaces, root, confinement checks, user namespace,
/// terminal. Returns the confinement to apply at exec and the terminal master.
fn prepare(
    setup: &HelperSetup,
    sock: &UnixStream,
) -> Result<(Confinement, Option<OwnedFd>), SpawnError> {
    nix::unistd::setsid().map_err(|e| fail(1, format!("setsid: {e}")))?;
    let mut user = None;
    match (&setup.container, setup.join) {
        (Some(spec), None) => build(spec, &setup.share_root)?,
        (None, Some(pid)) => user = join(pid)?,
        _ => {
            return Err(fail(
                1,
                "helper needs a container or a container to join".into(),
            ))
        }
    }
    // As runc: a program that is not there fails `create`, not `start`, so a caller never
    // holds a created container that cannot start.
    let env = spawn::environment(&setup.process);
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    if let Some(name) = setup.process.args.first() {
        spawn::resolve(name, path_var, &setup.process.cwd)?;
    }
    let confinement = Confinement::prepare(&setup.process, setup.seccomp.as_ref())?;
    // Limits that only the host's root may raise, before a user namespace takes that away.
    confinement
        .apply_limits()
        .map_err(|e| fail(1, format!("resource limits: {e}")))?;
    match (&setup.container, user) {
        (Some(spec), _) if spec.user_namespace.is_some() => enter_user_namespace(sock)?,
        (None, Some(ns)) => join_user(ns)?,
        _ => {}
    }
    let pty = match setup.process.terminal {
        true => Some(terminal(setup.process.console_size)?),
        false => None,
    };
    Ok((confinement, pty))
}

fn report(sock: &UnixStream, r: &HelperReport, fd: Option<&OwnedFd>) {
    let _ = send_msg(sock, r, fd);
}

fn exec(setup: &HelperSetup, confinement: &Confinement) -> SpawnError {
    let p = &setup.process;
    let env = spawn::environment(p);
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let program = match spawn::resolve(&p.args[0], path_var, &p.cwd) {
        Ok(prog) => prog,
        Err(e) => return e,
    };
    if let Err(e) = nix::unistd::chdir(Path::new(&p.cwd)) {
        return fail(1, format!("working directory {}: {e}", p.cwd));
    }
    if let Err(e) = confinement.apply() {
        return e;
    }
    let cstr = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let args: Vec<_> = p.args.iter().map(|a| cstr(a)).collect();
    let envp: Vec<_> = env.iter().map(|(k, v)| cstr(&format!("{k}={v}"))).collect();
    let e = match nix::unistd::execve(&cstr(&program), &args, &envp) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    let status = match e {
        nix::errno::Errno::ENOENT => 127,
        _ => 126,
    };
    fail(status, format!("exec {}: {e}", p.args[0]))
}

/// Runs the helper; does not return.
pub fn run() -> ! {
    // SAFETY: the agent passes the control socket as descriptor HELPER_FD.
    let mut sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(HELPER_FD) });
    let _ = nix::fcntl::fcntl(
        &sock,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let setup: HelperSetup = match recv_msg(&sock) {
        Ok(Some((s, _))) => s,
        _ => std::process::exit(1),
    };
    spawn::set_profile_env_to(setup.profile_env.clone());
    let confinement = match prepare(&setup, &sock) {
        Ok((confinement, pty)) => {
            report(&sock, &HelperReport::Ready, pty.as_ref());
            confinement
        }
        Err(e) => {
            report(
                &sock,
                &HelperReport::Failed {
                    status: e.status,
                    message: e.message,
                },
                None,
            );
            std::process::exit(e.status);
        }
    };
    // Wait for the start (one byte); a closed socket means the container was deleted.
    let mut b = [0u8; 1];
    if !matches!(sock.read(&mut b), Ok(1)) {
        std::process::exit(1);
    }
    let e = exec(&setup, &confinement);
    report(
        &sock,
        &HelperReport::Failed {
            status: e.status,
            message: e.message.clone(),
        },
        None,
    );
    std::process::exit(e.status);
}

/// Sends `msg` as one datagram of the seqpacket socket, with `fd` attached.
pub fn send_msg<T: serde::Serialize>(
    sock: &UnixStream,
    msg: &T,
    fd: Option<&OwnedFd>,
) -> std::io::Result<()> {
    let mut body = Vec::new();
    write_frame(&mut body, msg).map_err(|e| std::io::Error::other(e.to_string()))?;
    let iov = [std::io::IoSlice::new(&body)];
    let fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let cmsgs: &[nix::sys::socket::ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    nix::sys::socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    Ok(())
}

/// Receives one datagram and the descriptor sent with it; `None` at end of stream.
pub fn recv_msg<T: serde::de::DeserializeOwned>(
    sock: &UnixStream,
) -> std::io::Result<Option<(T, Option<File>)>> {
    let mut buf = vec![0u8; agent_protocol::MAX_FRAME + 4];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = nix::sys::socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fd = None;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: SCM_RIGHTS handed us a new descriptor that we now own.
                fd = Some(File::from(unsafe { OwnedFd::from_raw_fd(raw) }));
            }
        }
    }
    let n = msg.bytes;
    if n == 0 {
        return Ok(None);
    }
    let value = read_frame(&mut &buf[..n]).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(Some((value, fd)))
}
