//! `runvm template create|list|rm`: the VM templates containers start from.

use anyhow::bail;
use runtime_cli::assets::Assets;
use runtime_cli::template::build::{self, Built};
use vmm::{HostProfile, VmConfig};

use crate::cli::{Cli, Format, TemplateCommand};

/// The build lock the runvm that started this one handed over as descriptor `fd`: it must
/// be the store's lock file, held; it is not passed on to anything this process runs.
fn handed_lock(
    store: &runtime_cli::template::TemplateStore,
    fd: i32,
) -> anyhow::Result<std::fs::File> {
    use std::os::fd::BorrowedFd;
    // SAFETY: only borrowed to duplicate it; a descriptor that is not open fails below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let file = std::fs::File::from(
        rustix::io::fcntl_dupfd_cloexec(borrowed, 0)
            .map_err(|e| anyhow::anyhow!("--lock-fd {fd}: {e}"))?,
    );
    // SAFETY: `fd` was handed to this process for this use only; the duplicate above
    // holds the same lock, so the original is closed.
    unsafe { libc::close(fd) };
    if !store.is_build_lock(&file) {
        bail!(
            "--lock-fd {fd} is not the build lock of {}",
            store.dir().display()
        );
    }
    Ok(file)
}

pub fn run(cli: &Cli, command: &TemplateCommand) -> anyhow::Result<()> {
    let store = cli.globals.template_store();
    match command {
        TemplateCommand::Create(a) => {
            let assets =
                Assets::resolve(cli.globals.kernel.as_deref(), cli.globals.initrd.as_deref())?;
            let mut config = VmConfig::new(assets.kernel);
            config.initrd = Some(assets.initrd);
            config.mem_mib = a.memory;
            config.vcpus = a.vcpus;
            config.cmdline = a.kernel_params.clone();
            config.seccomp = cli.globals.seccomp.mode();
            config.validate()?;
            let lock = a.lock_fd.map(|fd| handed_lock(&store, fd)).transpose()?;
            match build::make(&store, config, HostProfile::detect(), lock)? {
                Built::Made(key) => println!("{key}"),
                Built::Existing(key) => {
                    log::info!("template {key} exists already");
                    println!("{key}");
                }
            }
        }
        TemplateCommand::List(a) => {
            let list = store.list()?;
            match a.format {
                Format::Json => println!("{}", serde_json::to_string(&list)?),
                Format::Table => {
                    println!(
                        "{:<32} {:>7} {:>5} {:>9} {:<20} PROBLEM",
                        "KEY", "MEMORY", "VCPUS", "DISK", "CREATED"
                    );
                    for t in &list {
                        let (mem, vcpus) = t
                            .shape
                            .as_ref()
                            .map_or((String::new(), String::new()), |s| {
                                (format!("{}M", s.mem_mib), s.vcpus.to_string())
                            });
                        println!(
                            "{:<32} {mem:>7} {vcpus:>5} {:>8}M {:<20} {}",
                            t.key,
                            t.disk_bytes >> 20,
                            humantime::format_rfc3339_seconds(
                                std::time::UNIX_EPOCH
                                    + std::time::Duration::from_secs(t.created.max(0) as u64)
                            ),
                            t.problem.as_deref().unwrap_or("-")
                        );
                    }
                }
            }
        }
        TemplateCommand::Rm(a) => {
            let keys: Vec<String> = if a.all {
                store.list()?.into_iter().map(|t| t.key).collect()
            } else {
                a.keys.clone()
            };
            let mut failed = 0;
            for key in &keys {
                if let Err(e) = store.remove(key) {
                    eprintln!("runvm: {e}");
                    failed += 1;
                }
            }
            if failed > 0 {
                bail!("{failed} of {} templates not removed", keys.len());
            }
        }
    }
    Ok(())
}
