//! `runvm boot`: boots a kernel (and optional initramfs) with the console on stdout and
//! exits 0 when the guest ends cleanly, non-zero with one line saying why otherwise.

use anyhow::{bail, Context};

use crate::cli::{BootArgs, Cli};
use runtime_cli::assets;
use vmm::{ConsoleOutput, HostProfile, VmBuilder, VmConfig};

pub fn run(cli: &Cli, args: &BootArgs) -> anyhow::Result<()> {
    let kernel = assets::kernel(cli.globals.kernel.as_deref())?;
    let mut config = VmConfig::new(kernel);
    // Without --initrd, the installed agent initramfs if there is one.
    config.initrd = assets::initrd(cli.globals.initrd.as_deref()).ok();
    config.cmdline = args.cmdline.clone();
    config.seccomp = cli.globals.seccomp.mode();
    config.mem_mib = args.mem;
    config.vcpus = args.cpus;
    config.console = match &args.console_log {
        Some(p) => ConsoleOutput::File(p.clone()),
        None => ConsoleOutput::Stdout,
    };
    let profile = HostProfile::detect();
    log::debug!("host: {}", profile.describe());
    let vmm = VmBuilder::new(config, profile).build()?;
    log::debug!("booting: {:?}", vmm.info());
    let exit = vmm.start().context("starting the VM")?.wait();
    if !exit.is_clean() {
        bail!("{exit}");
    }
    log::debug!("VM ended: {exit}");
    Ok(())
}
