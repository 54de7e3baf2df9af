//! OCI lifecycle hooks: each runs on the host with the container's state JSON on its
//! stdin, its `args` (argv[0] included), `env` and optional `timeout`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Hooks};

/// Which hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl Phase {
    fn list(self, hooks: &Hooks) -> Vec<Hook> {
        #[allow(deprecated)]
        let l = match self {
            Phase::Prestart => hooks.prestart(),
            Phase::CreateRuntime => hooks.create_runtime(),
            Phase::CreateContainer => hooks.create_container(),
            Phase::StartContainer => hooks.start_container(),
            Phase::Poststart => hooks.poststart(),
            Phase::Poststop => hooks.poststop(),
        };
        l.clone().unwrap_or_default()
    }
}

/// A hook that failed.
#[derive(Debug, thiserror::Error)]
#[error("{phase:?} hook {path}: {reason}")]
pub struct HookError {
    pub phase: Phase,
    pub path: String,
    pub reason: String,
}

fn run_one(phase: Phase, hook: &Hook, state_json: &str) -> Result<(), HookError> {
    let path = hook.path().to_string_lossy().into_owned();
    let err = |reason: String| HookError {
        phase,
        path: path.clone(),
        reason,
    };
    let args = hook.args().clone().unwrap_or_default();
    let mut cmd = Command::new(hook.path());
    if let Some((argv0, rest)) = args.split_first() {
        std::os::unix::process::CommandExt::arg0(&mut cmd, argv0);
        cmd.args(rest);
    }
    cmd.env_clear();
    for kv in hook.env().clone().unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(state_json.as_bytes());
    }
    let deadline = hook
        .timeout()
        .map(|t| Instant::now() + Duration::from_secs(t.max(1) as u64));
    loop {
        if let Some(status) = child.try_wait().map_err(|e| err(e.to_string()))? {
            if status.success() {
                return Ok(());
            }
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            return Err(err(format!("{status}: {}", stderr.trim())));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err(format!(
                "timed out after {} s",
                hook.timeout().unwrap_or(0)
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the hooks of `phase` in order; stops at the first failure.
pub fn run(hooks: Option<&Hooks>, phase: Phase, state_json: &str) -> Result<(), HookError> {
    let Some(hooks) = hooks else { return Ok(()) };
    for h in phase.list(hooks) {
        run_one(phase, &h, state_json)?;
    }
    Ok(())
}

/// Runs the hooks of `phase`, logging failures as warnings (poststart, poststop).
pub fn run_warn(hooks: Option<&Hooks>, phase: Phase, state_json: &str) {
    let Some(hooks) = hooks else { return };
    for h in phase.list(hooks) {
        if let Err(e) = run_one(phase, &h, state_json) {
            log::warn!("{e}");
        }
    }
}
