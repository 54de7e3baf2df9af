//! The tap backend of virtio-net: a Linux tap opened with `IFF_VNET_HDR` and `IFF_NO_PI`,
//! so frames carry the same 12-byte virtio-net header the guest uses and checksum and
//! segmentation offloads pass through untouched. [`Tap::create`] makes one in the calling
//! thread's network namespace (it needs CAP_NET_ADMIN there); [`Tap::from_fd`] takes one
//! that another process made and passed over.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{features, NetBackend, VNET_HDR_LEN};

/// `struct ifreq` as the tun ioctls use it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors making or taking a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("opening /dev/net/tun: {0}")]
    Open(#[source] std::io::Error),
    #[error("{0:?} is not a valid interface name")]
    BadName(String),
    #[error("creating tap {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the descriptor is not a tap with virtio-net headers ({0})")]
    NotTap(String),
    #[error("configuring tap {name}: {source}")]
    Configure {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Tap {
    /// Creates tap `name` (non-persistent: it goes with its last descriptor).
    pub fn create(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ']) {
            return Err(TapError::BadName(name.into()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Create {
                name: name.into(),
                source: last_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        tap.set_header_len()?;
        Ok(tap)
    }

    /// Takes a tap descriptor another process opened; checks it is one with virtio-net
    /// headers and makes it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes one `struct ifreq`, which `req` is; on another kind of
        // descriptor it fails without writing.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::NotTap(last_error().to_string()));
        }
        let want = (libc::IFF_TAP | libc::IFF_VNET_HDR) as libc::c_short;
        if req.flags & want != want {
            return Err(TapError::NotTap(format!("flags {:#x}", req.flags)));
        }
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        let configure = |source| TapError::Configure {
            name: name.clone(),
            source,
        };
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(|e| configure(e.into()))?;
        let nonblocking = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(nonblocking)).map_err(|e| configure(e.into()))?;
        let tap = Tap {
            file: File::from(fd),
            name: name.clone(),
        };
        tap.set_header_len()?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor, to pass to another process.
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.file)
    }

    fn set_header_len(&self) -> Result<(), TapError> {
        let len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) } < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                source: last_error(),
            });
        }
        Ok(())
    }

    fn set_offload_flags(&self, flags: libc::c_uint) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(last_error());
        }
        Ok(())
    }
}

/// The tap offload flags for the features a guest driver accepted: what frames written
/// towards the guest may leave to it (checksums, TCP and UDP segmentation).
pub fn offload_flags(guest: u64) -> libc::c_uint {
    if guest & features::GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    for (feature, flag) in [
        (features::GUEST_TSO4, libc::TUN_F_TSO4),
        (features::GUEST_TSO6, libc::TUN_F_TSO6),
        (features::GUEST_UFO, libc::TUN_F_UFO),
    ] {
        if guest & feature != 0 {
            flags |= flag;
        }
    }
    flags
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(std::io::Error::new(
                ErrorKind::WriteZero,
                "short write to the tap",
            ));
        }
        Ok(())
    }

    fn set_offloads(&mut self, guest_features: u64) -> std::io::Result<()> {
        let flags = offload_flags(guest_features);
        match self.set_offload_flags(flags) {
            // Kernels without UDP fragmentation offload refuse the flag: go without it.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && flags & libc::TUN_F_UFO != 0 => {
                self.set_offload_flags(flags & !libc::TUN_F_UFO)
            }
            r => r,
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_flags_follow_the_guest_features() {
        assert_eq!(offload_flags(0), 0);
        // Segmentation without checksum offload is not possible.
        assert_eq!(offload_flags(features::GUEST_TSO4), 0);
        assert_eq!(offload_flags(features::GUEST_CSUM), libc::TUN_F_CSUM);
        let all = features::GUEST_CSUM
            | features::GUEST_TSO4
            | features::GUEST_TSO6
            | features::GUEST_UFO;
        assert_eq!(
            offload_flags(all),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_opened() {
        for name in ["", "a/b", "sixteen-chars-xx"] {
            assert!(
                matches!(Tap::create(name), Err(TapError::BadName(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_descriptor_that_is_no_tap_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(Tap::from_fd(f.into()), Err(TapError::NotTap(_))));
    }
}
