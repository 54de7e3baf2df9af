//! runvm's guest agent.
//!
//! In a VM it is `/init` (PID 1): it mounts the basic file systems, reaps every process,
//! listens on vsock port 1024 for the host, tells the host it is ready, runs the processes
//! the host asks for and ends the VM when the container's main process is done.
//! With `--listen unix:PATH` it runs as an ordinary host process with the same protocol
//! over a Unix socket, for fast tests of everything but the PID-1 duties.

mod confine;
mod conn;
mod container;
mod identity;
mod init;
mod network;
mod power;
mod process;
mod reaper;
mod server;
mod spawn;

use std::path::PathBuf;

use agent_protocol::error_line;

/// How the agent was started.
#[derive(Debug)]
enum Mode {
    /// PID 1 in a VM.
    Vm,
    /// A host process listening on a Unix socket.
    Host(PathBuf),
}

fn parse_args() -> Result<Mode, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(Mode::Vm),
        [flag, spec] if flag == "--listen" => spec
            .strip_prefix("unix:")
            .map(|p| Mode::Host(PathBuf::from(p)))
            .ok_or_else(|| format!("--listen takes unix:PATH, not {spec:?}")),
        [flag] if flag == "container-init" => container::setup::run(),
        [flag] if flag == "--version" => {
            println!("runvm-agent {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0);
        }
        other => Err(format!(
            "usage: runvm-agent [--listen unix:PATH] (got {other:?})"
        )),
    }
}

fn main() {
    let mode = match parse_args() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("runvm-agent: {e}");
            std::process::exit(2);
        }
    };
    let result = match mode {
        Mode::Vm => init::run_as_init().map_err(|e| error_line(&e)),
        Mode::Host(path) => server::run_host(&path).map_err(|e| error_line(&e)),
    };
    if let Err(e) = result {
        eprintln!("runvm-agent: {e}");
        if std::process::id() == 1 {
            // Nothing can run without the agent: end the VM rather than hang it.
            power::power_off();
        }
        std::process::exit(1);
    }
}
