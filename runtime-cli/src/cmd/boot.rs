//! `runvm boot`: boots a kernel (and optional initramfs) with the console on stdout and
//! exits 0 when the guest ends cleanly, non-zero with one line saying why otherwise. With
//! `--snapshot-on LINE --snapshot DIR` it saves the VM once the console shows LINE and
//! ends it; with `--restore DIR` it resumes such a VM instead of booting.

use std::os::unix::fs::DirBuilderExt;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::{BootArgs, Cli};
use runtime_cli::assets;
use vmm::snapshot::Shape;
use vmm::{ConsoleOutput, HostProfile, VmBuilder, VmConfig};

/// How long the console may take to show the line a snapshot waits for.
const SNAPSHOT_LINE_TIMEOUT: Duration = Duration::from_secs(600);

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
    // A snapshot is taken and restored as one of this shape (the kernel, command line,
    // memory, vCPUs and, here, no virtio device).
    let shape = match args.restore.is_some() || args.snapshot.is_some() {
        true => {
            config.validate()?;
            Some(Shape::of(&config, &profile, &[]).context("reading the boot assets")?)
        }
        false => None,
    };
    let builder = VmBuilder::new(config, profile);
    let vmm = match (&args.restore, &shape) {
        (Some(dir), Some(shape)) => builder.restore(vmm::snapshot::load(dir, shape)?)?,
        _ => builder.build()?,
    };
    log::debug!("starting: {:?}", vmm.info());
    let watch = vmm.console_watch();
    if let Some(line) = &args.snapshot_on {
        watch.watch_for(line);
    }
    let vm = vmm.start().context("starting the VM")?;
    if let (Some(line), Some(dir), Some(shape)) = (&args.snapshot_on, &args.snapshot, &shape) {
        if !watch.wait_marker(SNAPSHOT_LINE_TIMEOUT) {
            vm.handle().stop();
            bail!("the console never showed {line:?}: {}", vm.wait());
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let saved = vm.snapshot(dir, shape);
        vm.handle().stop();
        vm.wait();
        if saved.is_err() {
            // Nothing of a failed snapshot stays (its files are gone already).
            let _ = std::fs::remove_dir(dir);
        }
        saved?;
        return Ok(());
    }
    let exit = vm.wait();
    if !exit.is_clean() {
        bail!("{exit}");
    }
    log::debug!("VM ended: {exit}");
    Ok(())
}
