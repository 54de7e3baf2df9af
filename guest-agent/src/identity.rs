//! The VM's own identity, given by the host before a container runs: fresh randomness
//! for the guest kernel's pool (then reseeded, so VMs restored from one template never
//! produce the same random bytes), the wall clock, and the hostname.
//!
//! Only an agent that is the VM's init applies it; one running on a host refuses (it
//! would set the host's clock).

use std::fs::File;
use std::os::fd::AsRawFd;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Most entropy bytes taken from one request.
const MAX_ENTROPY: usize = 512;

/// Errors applying an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the agent takes an identity only as a VM's init")]
    NotInVm,
    #[error("{0} bytes of entropy: between 16 and {MAX_ENTROPY} are taken")]
    Entropy(usize),
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("setting the clock: {0}")]
    Clock(#[source] nix::Error),
    #[error("setting the hostname {name:?}: {source}")]
    Hostname {
        name: String,
        #[source]
        source: nix::Error,
    },
}

/// Applies the identity: randomness, clock, hostname (when given).
pub fn apply(
    entropy: &[u8],
    realtime_ns: i64,
    hostname: Option<&str>,
) -> Result<(), IdentityError> {
    if !crate::network::in_vm() {
        return Err(IdentityError::NotInVm);
    }
    reseed(entropy)?;
    let ts = nix::sys::time::TimeSpec::new(
        realtime_ns.div_euclid(1_000_000_000),
        realtime_ns.rem_euclid(1_000_000_000),
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(IdentityError::Clock)?;
    if let Some(name) = hostname {
        nix::unistd::sethostname(name).map_err(|source| IdentityError::Hostname {
            name: name.to_string(),
            source,
        })?;
    }
    Ok(())
}

/// Mixes `entropy` into the input pool (credited: it comes from the host's kernel) and
/// reseeds the CRNG from it at once.
fn reseed(entropy: &[u8]) -> Result<(), IdentityError> {
    if entropy.len() < 16 || entropy.len() > MAX_ENTROPY {
        return Err(IdentityError::Entropy(entropy.len()));
    }
    let sys = |what| move |source| IdentityError::Sys { what, source };
    let random = File::options()
        .write(true)
        .open("/dev/urandom")
        .map_err(sys("opening /dev/urandom"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: `info` is a rand_pool_info whose buf_size matches the bytes that follow;
    // the kernel only reads it.
    let r = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if r < 0 {
        return Err(sys("adding entropy")(std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if r < 0 {
        return Err(sys("reseeding the CRNG")(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_on_a_host_refuses_an_identity() {
        let e = apply(&[7; 32], 0, Some("x")).unwrap_err();
        assert!(matches!(e, IdentityError::NotInVm), "{e}");
    }
}
