//! Starting one process from a `ProcessSpec`: its stdio (pipes, /dev/null or a new
//! terminal), environment, working directory, user and groups, umask, resource limits,
//! no_new_privileges and OOM score. Everything the child does between fork and exec is
//! prepared beforehand, so the child only makes system calls.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio as StdStdio};

use agent_protocol::{ProcessSpec, Stdio};
use nix::sys::resource::Resource;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

/// Environment the host profile asks for in every guest process (see `set_profile_env`).
static PROFILE_ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

/// Records variables of the agent's own environment that every process must get too:
/// on software-KVM hosts the kernel command line carries `GLIBC_TUNABLES` (keeping glibc
/// off AVX registers the guest kernel cannot preserve there). A process spec that sets a
/// variable itself keeps its own value.
pub fn set_profile_env() {
    let vars = ["GLIBC_TUNABLES"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    let _ = PROFILE_ENV.set(vars);
}

/// A started process and the host-facing ends of its stdio.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    /// Terminal master, when the process has a terminal.
    pub pty: Option<File>,
}

/// Why a process could not start, with the exit status that stands for it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SpawnError {
    pub status: i32,
    pub message: String,
}

/// A start failure that `status` stands for.
pub fn fail(status: i32, message: String) -> SpawnError {
    SpawnError { status, message }
}

fn rlimit_resource(name: &str) -> Option<Resource> {
    Some(match name {
        "RLIMIT_AS" => Resource::RLIMIT_AS,
        "RLIMIT_CORE" => Resource::RLIMIT_CORE,
        "RLIMIT_CPU" => Resource::RLIMIT_CPU,
        "RLIMIT_DATA" => Resource::RLIMIT_DATA,
        "RLIMIT_FSIZE" => Resource::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => Resource::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => Resource::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => Resource::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => Resource::RLIMIT_NICE,
        "RLIMIT_NOFILE" => Resource::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => Resource::RLIMIT_NPROC,
        "RLIMIT_RSS" => Resource::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => Resource::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => Resource::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => Resource::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => Resource::RLIMIT_STACK,
        _ => return None,
    })
}

/// Looks `name` up in `path_var` the way execvp does, so errors can say "not found"
/// (127) apart from "not executable" (126).
pub fn resolve(name: &str, path_var: Option<&str>, cwd: &str) -> Result<String, SpawnError> {
    use std::os::unix::fs::PermissionsExt;
    let check = |p: &std::path::Path| -> Result<(), SpawnError> {
        let meta = std::fs::metadata(p)
            .map_err(|_| fail(127, format!("{name}: no such file or directory")))?;
        if meta.is_dir() || meta.permissions().mode() & 0o111 == 0 {
            return Err(fail(
                126,
                format!("{name}: permission denied (not an executable file)"),
            ));
        }
        Ok(())
    };
    if name.contains('/') {
        let p = std::path::Path::new(cwd).join(name);
        check(&p)?;
        return Ok(name.to_string());
    }
    let path_var =
        path_var.unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let mut denied = None;
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = std::path::Path::new(dir).join(name);
        match check(&candidate) {
            Ok(()) => return Ok(candidate.to_string_lossy().into_owned()),
            Err(e) if e.status == 126 && candidate.exists() => denied = Some(e),
            Err(_) => {}
        }
    }
    Err(denied.unwrap_or_else(|| fail(127, format!("{name}: executable file not found in $PATH"))))
}

/// Checks what can be checked before the process starts: arguments, executable, cwd.
pub fn validate(spec: &ProcessSpec) -> Result<String, SpawnError> {
    let name = spec
        .args
        .first()
        .ok_or_else(|| fail(1, "process has no arguments".into()))?;
    if !std::path::Path::new(&spec.cwd).is_dir() {
        return Err(fail(
            1,
            format!("working directory {} does not exist", spec.cwd),
        ));
    }
    let path_var = spec.env.iter().find_map(|e| e.strip_prefix("PATH="));
    resolve(name, path_var, &spec.cwd)
}

/// The process attributes applied between fork (or namespace setup) and exec, prepared so
/// that applying them only makes system calls: safe in a child of a threaded process.
#[derive(Debug)]
pub struct ExecSettings {
    umask: Option<Mode>,
    groups: Vec<Gid>,
    uid: Uid,
    gid: Gid,
    no_new_privs: bool,
    limits: Vec<(Resource, u64, u64)>,
    oom: Option<Vec<u8>>,
    oom_path: CString,
}

impl ExecSettings {
    /// Prepares the attributes of `spec`.
    pub fn from_spec(spec: &ProcessSpec) -> Result<Self, SpawnError> {
        let mut limits = Vec::new();
        for r in &spec.rlimits {
            let res = rlimit_resource(&r.kind)
                .ok_or_else(|| fail(1, format!("unknown rlimit {}", r.kind)))?;
            limits.push((res, r.soft, r.hard));
        }
        Ok(ExecSettings {
            umask: spec.user.umask.map(Mode::from_bits_truncate),
            groups: spec
                .user
                .additional_gids
                .iter()
                .map(|g| Gid::from_raw(*g))
                .collect(),
            uid: Uid::from_raw(spec.user.uid),
            gid: Gid::from_raw(spec.user.gid),
            no_new_privs: spec.no_new_privileges,
            limits,
            oom: spec.oom_score_adj.map(|v| v.to_string().into_bytes()),
            oom_path: CString::new("/proc/self/oom_score_adj").expect("static path"),
        })
    }

    /// Applies them to the calling process: umask, OOM score, rlimits, groups, gid, uid,
    /// no_new_privileges. Makes system calls only.
    pub fn apply(&self) -> std::io::Result<()> {
        self.apply_limits()?;
        self.apply_user()?;
        if self.no_new_privs {
            nix::sys::prctl::set_no_new_privs()?;
        }
        Ok(())
    }

    /// The umask, the OOM score and the resource limits.
    pub fn apply_limits(&self) -> std::io::Result<()> {
        if let Some(mask) = self.umask {
            nix::sys::stat::umask(mask);
        }
        if let Some(v) = &self.oom {
            let flags = nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC;
            let fd = nix::fcntl::open(self.oom_path.as_c_str(), flags, Mode::empty())?;
            nix::unistd::write(&fd, v)?;
        }
        for (res, soft, hard) in &self.limits {
            nix::sys::resource::setrlimit(*res, *soft, *hard)?;
        }
        Ok(())
    }

    /// The supplementary groups, the gid and the uid.
    pub fn apply_user(&self) -> std::io::Result<()> {
        nix::unistd::setgroups(&self.groups)?;
        nix::unistd::setgid(self.gid)?;
        nix::unistd::setuid(self.uid)?;
        Ok(())
    }
}

/// The environment a process gets: the host profile's variables, then the spec's.
pub fn environment(spec: &ProcessSpec) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = PROFILE_ENV.get().cloned().unwrap_or_default();
    for kv in &spec.env {
        if let Some((k, v)) = kv.split_once('=') {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
    }
    env
}

/// The profile's variables (for helpers that run in another process).
pub fn profile_env() -> Vec<(String, String)> {
    PROFILE_ENV.get().cloned().unwrap_or_default()
}

/// Sets the profile's variables in a helper process that received them from the agent.
pub fn set_profile_env_to(vars: Vec<(String, String)>) {
    let _ = PROFILE_ENV.set(vars);
}

pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fail(1, format!("pipe: {e}")))
}

/// Gives `cmd` a new terminal as its stdio; returns the master.
fn terminal_stdio(cmd: &mut Command, spec: &ProcessSpec) -> Result<File, SpawnError> {
    let winsize = spec.console_size.map(|s| nix::pty::Winsize {
        ws_row: s.height,
        ws_col: s.width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    });
    let pty =
        nix::pty::openpty(winsize.as_ref(), None).map_err(|e| fail(1, format!("openpty: {e}")))?;
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| fail(1, format!("dup: {e}")));
    cmd.stdin(StdStdio::from(dup(&pty.slave)?))
        .stdout(StdStdio::from(dup(&pty.slave)?))
        .stderr(StdStdio::from(pty.slave));
    let cloexec = nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC);
    nix::fcntl::fcntl(&pty.master, cloexec).map_err(|e| fail(1, format!("fcntl: {e}")))?;
    Ok(File::from(pty.master))
}

/// Gives `cmd` pipes for the streams `stdio` asks for (/dev/null for the others); returns
/// the agent's ends.
fn pipe_stdio(cmd: &mut Command, stdio: Stdio, out: &mut Spawned) -> Result<(), SpawnError> {
    if stdio.stdin {
        let (r, w) = pipe()?;
        cmd.stdin(StdStdio::from(r));
        out.stdin = Some(File::from(w));
    } else {
        cmd.stdin(StdStdio::null());
    }
    for (wanted, is_err) in [(stdio.stdout, false), (stdio.stderr, true)] {
        let child_end = if wanted {
            let (r, w) = pipe()?;
            *if is_err {
                &mut out.stderr
            } else {
                &mut out.stdout
            } = Some(File::from(r));
            StdStdio::from(w)
        } else {
            StdStdio::null()
        };
        if is_err {
            cmd.stderr(child_end);
        } else {
            cmd.stdout(child_end);
        }
    }
    Ok(())
}

/// Starts `spec` with stdio per `stdio` (ignored when the spec asks for a terminal).
pub fn spawn(spec: &ProcessSpec, stdio: Stdio) -> Result<Spawned, SpawnError> {
    let program = validate(spec)?;
    let mut cmd = Command::new(&program);
    cmd.arg0(&spec.args[0])
        .args(&spec.args[1..])
        .env_clear()
        .current_dir(&spec.cwd);
    cmd.envs(environment(spec));
    let mut out = Spawned {
        pid: 0,
        stdin: None,
        stdout: None,
        stderr: None,
        pty: None,
    };
    if spec.terminal {
        out.pty = Some(terminal_stdio(&mut cmd, spec)?);
    } else {
        pipe_stdio(&mut cmd, stdio, &mut out)?;
    }

    let settings = ExecSettings::from_spec(spec)?;
    let terminal = spec.terminal;
    let child_setup = move || {
        nix::unistd::setsid()?;
        if terminal {
            rustix::process::ioctl_tiocsctty(std::io::stdin())?;
        }
        settings.apply()
    };
    // SAFETY: the hook runs in the child between fork and exec and only makes system calls
    // on data prepared above; it allocates nothing.
    unsafe { cmd.pre_exec(child_setup) };

    let child = cmd.spawn().map_err(|e| {
        let status = match e.raw_os_error() {
            Some(libc::ENOENT) => 127,
            Some(libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::EPERM) => 126,
            _ => 1,
        };
        fail(status, format!("starting {}: {e}", spec.args[0]))
    })?;
    out.pid = child.id() as i32;
    // The reaper collects the exit status; the Child handle is not waited on.
    drop(child);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(args: &[&str]) -> ProcessSpec {
        ProcessSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/usr/bin:/bin".into()],
            cwd: "/".into(),
            ..Default::default()
        }
    }

    #[test]
    fn missing_and_unexecutable_programs_map_to_127_and_126() {
        assert_eq!(
            validate(&spec(&["no-such-program-xyz"]))
                .unwrap_err()
                .status,
            127
        );
        assert_eq!(validate(&spec(&["/no/such/file"])).unwrap_err().status, 127);
        assert_eq!(validate(&spec(&["/etc/passwd"])).unwrap_err().status, 126);
        assert_eq!(validate(&spec(&["/tmp"])).unwrap_err().status, 126);
        assert_eq!(validate(&spec(&["sh"])).unwrap(), "/usr/bin/sh");
        let mut s = spec(&["sh"]);
        s.cwd = "/no/such/dir".into();
        assert_eq!(validate(&s).unwrap_err().status, 1);
        assert_eq!(validate(&spec(&[])).unwrap_err().status, 1);
    }

    #[test]
    fn rlimit_names() {
        assert_eq!(
            rlimit_resource("RLIMIT_NOFILE"),
            Some(Resource::RLIMIT_NOFILE)
        );
        assert_eq!(rlimit_resource("RLIMIT_BOGUS"), None);
    }
}
