//! `runvm vmm-serve` (hidden): the container's VMM process, started by `create`.

use runtime_cli::lifecycle;

use crate::cli::{Cli, VmmServeArgs};

pub fn run(cli: &Cli, a: &VmmServeArgs) -> i32 {
    lifecycle::vmm_serve(&cli.globals, &a.create, a.ready_fd)
}
