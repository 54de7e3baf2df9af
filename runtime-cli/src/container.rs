//! One container as the commands see it: its state directory and recorded state, its
//! status, its VMM process (reached through the control socket, or killed by pid when it
//! must go), and the bundle's hooks.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::Hooks;

use crate::control::{self, ControlError, ControlRequest, ControlResponse, Stats};
use crate::state::{files, process_start_time, State, StateDir, StateError, Status};

/// How long the VMM may take to answer a control request (start waits for the exec).
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

/// A container's directory and state.
#[derive(Debug, Clone)]
pub struct Container {
    pub dir: StateDir,
    pub state: State,
}

impl Container {
    /// Loads container `id` under `root`.
    pub fn load(root: &Path, id: &str) -> Result<Self, StateError> {
        let dir = StateDir::new(root, id)?;
        if !dir.dir.exists() {
            return Err(StateError::NotFound(id.to_string()));
        }
        let state = dir.load()?;
        Ok(Container { dir, state })
    }

    /// The status now.
    pub fn status(&self) -> Status {
        self.state.refreshed()
    }

    /// Sends a request to the container's VMM.
    pub fn control(&self, request: &ControlRequest) -> Result<ControlResponse, ControlError> {
        control::call(&self.dir.file(files::CONTROL), request, CONTROL_TIMEOUT)
    }

    /// Sends a request that hands the VMM the descriptor `fd`.
    pub fn control_with_fd(
        &self,
        request: &ControlRequest,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<ControlResponse, ControlError> {
        control::call_with_fd(&self.dir.file(files::CONTROL), request, fd, CONTROL_TIMEOUT)
    }

    /// The state JSON hooks and `state` print.
    pub fn state_json(&self) -> String {
        self.state.to_output().to_string()
    }

    /// The bundle's hooks, if its config is still readable.
    pub fn hooks(&self) -> Option<Hooks> {
        let spec = oci_spec::runtime::Spec::load(self.state.bundle.join("config.json")).ok()?;
        spec.hooks().clone()
    }

    /// The cgroup the VMM joined, as recorded at create.
    pub fn cgroups_path(&self) -> Option<String> {
        self.state.cgroups_path.clone()
    }

    /// The VMM's pid, if the process is still the one this container started.
    fn live_vmm(&self) -> Option<Pid> {
        let pid = self.state.pid?;
        (process_start_time(pid) == Some(self.state.vmm_start_time)).then(|| Pid::from_raw(pid))
    }

    /// Sends `signal` to the VMM process itself (it forwards what it can catch).
    pub fn signal_vmm(&self, signal: i32) -> nix::Result<()> {
        let Some(pid) = self.live_vmm() else {
            return Err(nix::errno::Errno::ESRCH);
        };
        let sig = Signal::try_from(signal)?;
        nix::sys::signal::kill(pid, sig)
    }

    /// Kills the VMM process (if it is still the one we started) and waits until it is
    /// gone. Returns false if it did not go within the timeout.
    pub fn kill_vmm(&self, timeout: Duration) -> bool {
        let Some(pid) = self.live_vmm() else {
            return true;
        };
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        let deadline = Instant::now() + timeout;
        while self.live_vmm().is_some() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// The host processes that make up the container: the VMM and the proxies of running
    /// `exec`s (what `docker top` matches against the host's process table).
    pub fn host_pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self.state.pid.into_iter().collect();
        if let Ok(entries) = std::fs::read_dir(self.dir.file(files::EXECS)) {
            let mut execs: Vec<i32> = entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|p| process_start_time(*p).is_some())
                .collect();
            execs.sort_unstable();
            pids.extend(execs);
        }
        pids
    }

    /// The container's processes as the guest numbers them.
    pub fn guest_pids(&self) -> Result<Vec<i32>, ControlError> {
        match self.control(&ControlRequest::Pids)? {
            ControlResponse::Pids { pids } => Ok(pids),
            other => Err(ControlError::Refused(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Resource figures of the VM.
    pub fn stats(&self) -> Result<Stats, ControlError> {
        match self.control(&ControlRequest::Stats)? {
            ControlResponse::Stats { stats } => Ok(stats),
            other => Err(ControlError::Refused(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }
}

/// Parses a signal given as a name (`TERM`, `SIGTERM`, any case) or a number.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("invalid signal number {n}"))
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    if let Some(rt) = name.strip_prefix("SIGRTMIN") {
        let base = libc::SIGRTMIN();
        let off: i32 = if rt.is_empty() {
            0
        } else {
            rt.trim_start_matches('+')
                .parse()
                .map_err(|_| format!("invalid signal {s:?}"))?
        };
        return Ok(base + off);
    }
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| format!("invalid signal {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("TERM"), Ok(15));
        assert_eq!(parse_signal("SIGKILL"), Ok(9));
        assert_eq!(parse_signal("usr1"), Ok(libc::SIGUSR1));
        assert_eq!(parse_signal("15"), Ok(15));
        assert_eq!(parse_signal("SIGRTMIN+2"), Ok(libc::SIGRTMIN() + 2));
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("99").is_err());
    }
}
