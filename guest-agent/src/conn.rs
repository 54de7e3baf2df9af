//! Connections to the host: the listening socket (vsock in a VM, Unix on the host) and the
//! one-shot "ready" connection a VM agent makes to the host.
//!
//! Every accepted connection is returned as a `UnixStream`: for reading, writing and
//! shutting down, a connected vsock socket behaves like any other stream socket.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, VsockAddr};

/// Host context id.
const VMADDR_CID_HOST: u32 = 2;
/// Any local context id.
const VMADDR_CID_ANY: u32 = u32::MAX;

/// Where host connections arrive.
#[derive(Debug)]
pub enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

impl Listener {
    /// Listens on vsock `port`. Accepted connections inherit a 1 MiB buffer: the kernel
    /// caps a connection's send window at its own buffer size (256 KiB by default), and a
    /// larger window means fewer credit updates, each an interrupt for the guest.
    pub fn vsock(port: u32) -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        set_vsock_buffer(&fd, 1 << 20)?;
        socket::bind(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))?;
        socket::listen(&fd, socket::Backlog::new(64).map_err(io::Error::from)?)?;
        Ok(Listener::Vsock(fd))
    }

    /// Listens on the Unix socket `path` (replacing a stale one). The socket is bound and
    /// listening under a temporary name first and then renamed: whoever waits for `path`
    /// to appear never connects between bind and listen (ECONNREFUSED).
    pub fn unix(path: &Path) -> io::Result<Self> {
        let tmp = path
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!(".agent-{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        std::fs::rename(&tmp, path)?;
        Ok(Listener::Unix(listener))
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<UnixStream> {
        match self {
            Listener::Vsock(fd) => {
                let c = socket::accept4(fd, SockFlag::SOCK_CLOEXEC)?;
                Ok(UnixStream::from(c))
            }
            Listener::Unix(l) => l.accept().map(|(s, _)| s),
        }
    }
}

const SO_VM_SOCKETS_BUFFER_SIZE: libc::c_int = 0;
const SO_VM_SOCKETS_BUFFER_MAX_SIZE: libc::c_int = 2;

fn set_vsock_buffer(fd: &OwnedFd, size: u64) -> io::Result<()> {
    for opt in [SO_VM_SOCKETS_BUFFER_MAX_SIZE, SO_VM_SOCKETS_BUFFER_SIZE] {
        // SAFETY: setsockopt reads a u64 from a valid pointer of the given length.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::AF_VSOCK,
                opt,
                (&size as *const u64).cast(),
                std::mem::size_of::<u64>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Connects to the host's vsock `port`.
pub fn connect_host(port: u32) -> io::Result<UnixStream> {
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::connect(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_HOST, port))?;
    Ok(UnixStream::from(fd))
}
