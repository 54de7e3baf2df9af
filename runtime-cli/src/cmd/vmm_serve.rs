//! `runvm vmm-serve` (hidden): the container's VMM process, started by `create`.

use runtime_cli::bundle::Bundle;
use runtime_cli::state::StateDir;
use runtime_cli::supervisor::{self, SupervisorConfig};
use runtime_cli::translate;

use crate::cli::{Cli, VmmServeArgs};

pub fn run(cli: &Cli, a: &VmmServeArgs) -> i32 {
    let ready = super::create::ready_fd(a.ready_fd);
    let setup = (|| -> anyhow::Result<SupervisorConfig> {
        let state = StateDir::new(&cli.root, &a.create.id)?;
        let bundle = Bundle::load(&a.create.bundle)?;
        let plan = translate::plan(&bundle, a.create.no_pivot)?;
        let (kernel, initrd) = super::create::assets_for(cli, &plan)?;
        Ok(SupervisorConfig {
            state,
            plan,
            kernel,
            initrd,
            console_socket: a.create.console_socket.clone(),
            own_tty: false,
            auto_start: false,
            systemd_cgroup: cli.systemd_cgroup,
        })
    })();
    let cfg = match setup {
        Ok(c) => c,
        Err(e) => {
            supervisor::report_ready(ready, &Err(format!("{e:#}")));
            return 1;
        }
    };
    match supervisor::prepare(&cfg) {
        Ok(p) => supervisor::run(&cfg, p, ready),
        Err(e) => {
            // `create` reports it (and logs it).
            supervisor::report_ready(ready, &Err(e));
            1
        }
    }
}
