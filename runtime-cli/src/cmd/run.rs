//! `runvm run`: create and start in one go. In the foreground this process is the
//! container's VMM: it exits with the container's status and removes the container
//! (unless --keep); with --detach it returns once the container started.

use std::io::IsTerminal;

use anyhow::bail;
use runtime_cli::hooks::{self, Phase};
use runtime_cli::supervisor::{self, SupervisorConfig};

use crate::cli::{Cli, IdArg, RunArgs};

pub fn run(cli: &Cli, a: &RunArgs) -> anyhow::Result<i32> {
    if a.detach {
        super::create::run(cli, &a.create)?;
        let id = IdArg {
            id: a.create.id.clone(),
        };
        if let Err(e) = super::start::run(cli, &id) {
            let _ = super::delete::run(
                cli,
                &crate::cli::DeleteArgs {
                    force: true,
                    id: id.id,
                },
            );
            return Err(e);
        }
        return Ok(0);
    }
    // In the foreground a terminal can be the caller's own.
    let own_tty = a.create.console_socket.is_none() && std::io::stdin().is_terminal();
    let check = if own_tty {
        let mut c = a.create.clone();
        // check() insists on a console socket for terminals; ours is stdin.
        c.console_socket = None;
        super::create::check_allowing_own_tty(cli, &c)
    } else {
        super::create::check(cli, &a.create)
    };
    let (dir, bundle, plan, kernel, initrd) = check?;
    if plan.process.terminal && a.create.console_socket.is_none() && !own_tty {
        bail!(
            "process.terminal is set but stdin is not a terminal and no --console-socket was given"
        );
    }
    dir.create()?;
    let me = std::process::id() as i32;
    let result = (|| -> anyhow::Result<i32> {
        let c = super::create::record(&dir, &bundle, me, true)?;
        let cfg = SupervisorConfig {
            state: dir.clone(),
            plan,
            kernel,
            initrd,
            console_socket: a.create.console_socket.clone(),
            own_tty: own_tty
                && bundle
                    .spec
                    .process()
                    .as_ref()
                    .and_then(|p| p.terminal())
                    .unwrap_or(false),
            auto_start: true,
            systemd_cgroup: cli.systemd_cgroup,
        };
        let prepared = supervisor::prepare(&cfg).map_err(|e| anyhow::anyhow!(e))?;
        let hooks = bundle.spec.hooks().clone();
        let json = c.state_json();
        for phase in [
            Phase::Prestart,
            Phase::CreateRuntime,
            Phase::CreateContainer,
            Phase::StartContainer,
        ] {
            hooks::run(hooks.as_ref(), phase, &json)?;
        }
        if let Some(p) = &a.create.pid_file {
            super::create::write_pid_file(p, me)?;
        }
        hooks::run_warn(hooks.as_ref(), Phase::Poststart, &json);
        let status = supervisor::run(&cfg, prepared, None);
        if !a.keep {
            hooks::run_warn(hooks.as_ref(), Phase::Poststop, &json);
        }
        Ok(status)
    })();
    if !a.keep || result.is_err() {
        let _ = dir.remove();
    }
    result
}
