//! `runvm vm-run`: runs one command in a fresh VM whose root is the agent initramfs, with
//! runvm's stdin, stdout and stderr relayed to it, and exits with its status.

use agent_protocol::ProcessSpec;
use anyhow::{bail, Context};
use runtime_cli::assets::Assets;
use vmm::{ConsoleOutput, VmConfig};

use crate::cli::{Cli, VmRunArgs};

pub fn run(cli: &Cli, args: &VmRunArgs) -> anyhow::Result<i32> {
    if args.command.is_empty() {
        bail!("no command given (runvm vm-run [options] -- COMMAND [ARGS...])");
    }
    let assets = Assets::resolve(cli.globals.kernel.as_deref(), cli.globals.initrd.as_deref())?;
    let mut config = VmConfig::new(assets.kernel);
    config.initrd = Some(assets.initrd);
    config.mem_mib = args.mem;
    config.vcpus = args.cpus;
    config.cmdline = args.cmdline.clone();
    config.seccomp = cli.globals.seccomp.mode();
    config.console = args
        .console_log
        .clone()
        .map_or(ConsoleOutput::Sink, ConsoleOutput::File);
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    env.extend(args.env.iter().cloned());
    let spec = ProcessSpec {
        args: args.command.clone(),
        env,
        cwd: args.cwd.clone(),
        ..Default::default()
    };
    let dir = std::env::temp_dir().join(format!("runvm-vm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = runtime_cli::vm_run::run_command(config, &dir, spec);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(result?)
}
