//! `runvm create`: boots the container's VM in a detached VMM process and returns once the
//! container's process is prepared and waiting for `start`; on any failure nothing stays.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context};
use runtime_cli::bundle::Bundle;
use runtime_cli::container::Container;
use runtime_cli::hooks::{self, Phase};
use runtime_cli::logging::rfc3339_now;
use runtime_cli::state::{process_start_time, State, StateDir, Status, OCI_VERSION};
use runtime_cli::{assets, translate};

use crate::cli::{Cli, CreateArgs};

/// Kernel and initramfs for a plan: flag, then the bundle's `vm` section, then the
/// environment and install paths.
pub fn assets_for(cli: &Cli, plan: &translate::Plan) -> anyhow::Result<(PathBuf, PathBuf)> {
    let kernel = assets::kernel(cli.kernel.as_deref().or(plan.sizing.kernel.as_deref()))?;
    let initrd = assets::initrd(cli.initrd.as_deref().or(plan.sizing.initrd.as_deref()))?;
    Ok((kernel, initrd))
}

type Checked = (StateDir, Bundle, translate::Plan, PathBuf, PathBuf);

/// Checks everything that can be checked before anything is created.
pub fn check(cli: &Cli, a: &CreateArgs) -> anyhow::Result<Checked> {
    check_inner(cli, a, false)
}

/// As [`check`], for `run` in the foreground, whose terminal may be its own stdin.
pub fn check_allowing_own_tty(cli: &Cli, a: &CreateArgs) -> anyhow::Result<Checked> {
    check_inner(cli, a, true)
}

fn check_inner(cli: &Cli, a: &CreateArgs, own_tty: bool) -> anyhow::Result<Checked> {
    let dir = StateDir::new(&cli.root, &a.id)?;
    if a.preserve_fds > 0 {
        bail!("--preserve-fds is not supported: descriptors cannot be passed into the VM");
    }
    let bundle = Bundle::load(&a.bundle)?;
    let plan = translate::plan(&bundle, a.no_pivot)?;
    let (kernel, initrd) = assets_for(cli, &plan)?;
    if let Some(p) = &a.pid_file {
        let parent = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            bail!("pid file directory {} does not exist", parent.display());
        }
    }
    match (&a.console_socket, plan.process.terminal) {
        (Some(s), _) if !s.exists() => bail!("console socket {} does not exist", s.display()),
        (None, true) if !own_tty => bail!("process.terminal is set: a --console-socket is needed"),
        _ => {}
    }
    if dir.exists() {
        bail!("container {} already exists", a.id);
    }
    Ok((dir, bundle, plan, kernel, initrd))
}

/// Writes the pid file atomically, as runc does (no newline).
pub fn write_pid_file(path: &Path, pid: i32) -> anyhow::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, pid.to_string())
        .with_context(|| format!("writing pid file {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing pid file {}", path.display()))?;
    Ok(())
}

/// The VMM's command line: `runvm [globals] vmm-serve ...`.
fn vmm_command(cli: &Cli, a: &CreateArgs, kernel: &Path, initrd: &Path) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("finding the runvm binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(&cli.root)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd);
    if let Some(l) = &cli.log {
        cmd.arg("--log").arg(l);
    }
    cmd.arg("--log-format").arg(match cli.log_format {
        runtime_cli::logging::LogFormat::Text => "text",
        runtime_cli::logging::LogFormat::Json => "json",
    });
    if cli.debug {
        cmd.arg("--debug");
    }
    if cli.systemd_cgroup {
        cmd.arg("--systemd-cgroup");
    }
    cmd.arg("vmm-serve")
        .arg("--ready-fd")
        .arg("3")
        .arg("--bundle")
        .arg(&a.bundle);
    if let Some(s) = &a.console_socket {
        cmd.arg("--console-socket").arg(s);
        // With a terminal the container's stdio is the pty: the VMM must not keep the
        // caller's stdio, or a caller that reads `create`'s output until EOF (containerd's
        // shim does) would wait as long as the container lives. Its log goes to --log.
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    if a.no_pivot {
        cmd.arg("--no-pivot");
    }
    cmd.arg(&a.id);
    Ok(cmd)
}

/// Starts the detached VMM and waits for its ready report; returns its pid.
pub fn spawn_vmm(cli: &Cli, a: &CreateArgs, kernel: &Path, initrd: &Path) -> anyhow::Result<i32> {
    let (mut ready_r, ready_w) = {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        (std::fs::File::from(r), w)
    };
    let raw = ready_w.as_raw_fd();
    let mut cmd = vmm_command(cli, a, kernel, initrd)?;
    // SAFETY: setsid and dup2 in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the VMM process")?;
    drop(ready_w);
    let mut report = String::new();
    let _ = ready_r.read_to_string(&mut report);
    let pid = child.id() as i32;
    match report.lines().next() {
        Some("ok") => Ok(pid),
        Some(line) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(anyhow!("{}", line.trim_start_matches("error: ")))
        }
        None => {
            let status = child.wait()?;
            Err(anyhow!(
                "the VMM process ended before the container was ready ({status})"
            ))
        }
    }
}

/// Records a created container and runs its create-time hooks.
pub fn record(
    dir: &StateDir,
    bundle: &Bundle,
    pid: i32,
    started: bool,
) -> anyhow::Result<Container> {
    let annotations = bundle
        .spec
        .annotations()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let state = State {
        oci_version: OCI_VERSION.into(),
        id: dir.id.clone(),
        status: Status::Created,
        pid: Some(pid),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        created: rfc3339_now(),
        owner: "root".into(),
        annotations,
        vmm_start_time: process_start_time(pid)
            .ok_or_else(|| anyhow!("the VMM process {pid} is gone"))?,
        started,
        paused: false,
    };
    dir.save(&state)?;
    Ok(Container {
        dir: dir.clone(),
        state,
    })
}

pub fn run(cli: &Cli, a: &CreateArgs) -> anyhow::Result<()> {
    let (dir, bundle, _plan, kernel, initrd) = check(cli, a)?;
    dir.create()?;
    let result = (|| {
        let _lock = dir.lock()?;
        let pid = spawn_vmm(cli, a, &kernel, &initrd)?;
        let c = record(&dir, &bundle, pid, false)?;
        let hooks = bundle.spec.hooks().clone();
        let json = c.state_json();
        let hooked = hooks::run(hooks.as_ref(), Phase::Prestart, &json)
            .and_then(|()| hooks::run(hooks.as_ref(), Phase::CreateRuntime, &json))
            .and_then(|()| hooks::run(hooks.as_ref(), Phase::CreateContainer, &json));
        if let Err(e) = hooked {
            c.kill_vmm(std::time::Duration::from_secs(10));
            return Err(e.into());
        }
        if let Some(p) = &a.pid_file {
            if let Err(e) = write_pid_file(p, pid) {
                c.kill_vmm(std::time::Duration::from_secs(10));
                return Err(e);
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = dir.remove();
    }
    result
}

/// The VMM side of the ready pipe, from `--ready-fd`.
pub fn ready_fd(fd: Option<i32>) -> Option<OwnedFd> {
    // SAFETY: create passes the write end of its ready pipe as this descriptor.
    fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}
