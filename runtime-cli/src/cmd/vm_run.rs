//! `runvm vm-run`: runs one command in a fresh VM whose root is the agent initramfs, with
//! runvm's stdin, stdout and stderr proxied to it, and exits with its status. It is the
//! shortest path through VM, vsock and agent, without any OCI bundle.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use agent_protocol::{ProcessSpec, User};
use anyhow::{bail, Context};
use runtime_cli::agent_client::{start_process, ClientError, HostStdio, Launch};
use runtime_cli::assets;
use runtime_cli::sandbox::Sandbox;
use vmm::{ConsoleOutput, VmConfig};

use crate::cli::{Cli, VmRunArgs};

/// How long the agent may take to come up (a cold boot on software KVM takes ~20 s).
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the VM may take to end after the process's status arrived.
const END_GRACE: Duration = Duration::from_secs(10);

/// A file of our own on one of runvm's standard streams.
fn dup_std(fd: impl AsFd) -> anyhow::Result<File> {
    Ok(File::from(fd.as_fd().try_clone_to_owned()?))
}

pub fn run(cli: &Cli, args: &VmRunArgs) -> anyhow::Result<i32> {
    if args.command.is_empty() {
        bail!("no command given (runvm vm-run [options] -- COMMAND [ARGS...])");
    }
    let mut config = VmConfig::new(assets::kernel(cli.kernel.as_deref())?);
    config.initrd = Some(assets::initrd(cli.initrd.as_deref())?);
    config.mem_mib = args.mem;
    config.vcpus = args.cpus;
    config.cmdline = args.cmdline.clone();
    config.console = args
        .console_log
        .clone()
        .map_or(ConsoleOutput::Sink, ConsoleOutput::File);

    let dir = std::env::temp_dir().join(format!("runvm-vm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(config, &dir, args);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(config: VmConfig, dir: &std::path::Path, args: &VmRunArgs) -> anyhow::Result<i32> {
    let sandbox = Sandbox::boot(config, dir, READY_TIMEOUT)?;
    log::debug!("agent ready: {}", sandbox.agent);
    let client = sandbox.client().clone();
    let mut control = client.control()?;

    // If the VM dies, unblock whoever waits on the agent.
    let handle = sandbox.handle();
    let watched = control.try_clone_stream()?;
    std::thread::spawn(move || {
        handle.wait_ended(None);
        let _ = watched.shutdown(std::net::Shutdown::Both);
    });

    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    env.extend(args.env.iter().cloned());
    let spec = ProcessSpec {
        args: args.command.clone(),
        env,
        cwd: args.cwd.clone(),
        user: User::default(),
        ..Default::default()
    };
    let stdio = HostStdio {
        stdin: Some(Box::new(dup_std(std::io::stdin())?) as Box<dyn Read + Send>),
        stdout: Some(Box::new(dup_std(std::io::stdout())?) as Box<dyn Write + Send>),
        stderr: Some(Box::new(dup_std(std::io::stderr())?) as Box<dyn Write + Send>),
    };
    let outcome = start_process(&client, &mut control, "main", spec, stdio, Launch::init())
        .and_then(|p| p.finish(&mut control));
    drop(control);
    if outcome.is_err() {
        // The main process never ran to its end, so the agent will not end the VM itself.
        if let Ok(mut c) = client.control() {
            let _ = c.shutdown();
        }
    }
    let exit = sandbox.finish(END_GRACE);
    match outcome {
        Ok(status) => {
            if !exit.is_clean() {
                log::warn!("the VM ended badly after the process: {exit}");
            }
            Ok(status)
        }
        Err(ClientError::Exec { status, message }) => {
            eprintln!("runvm: {message}");
            Ok(status)
        }
        Err(e) if !exit.is_clean() => bail!("the VM ended before the process did: {exit} ({e})"),
        Err(e) => Err(e.into()),
    }
}
