//! `runvm`: the OCI runtime command line. Parses flags, sets up logging and dispatches to
//! one module per verb; errors end as one line on stderr (and in the `--log` file).

mod boot;
mod cli;
mod vm_run;

use runtime_cli::{assets, logging};

use clap::Parser;

fn main() {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One line, like every other runvm error; `--help` has the details.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("runvm: {}", first.trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    if let Err(e) = logging::init(cli.log.as_deref(), cli.log_format, cli.debug) {
        eprintln!("runvm: cannot open log file: {e}");
        std::process::exit(1);
    }
    let result = match &cli.command {
        cli::Command::Boot(args) => boot::run(&cli, args),
        cli::Command::VmRun(args) => {
            vm_run::run(&cli, args).map(|status| std::process::exit(status))
        }
        cli::Command::Initramfs(args) => assets::write_initramfs(&args.agent, &args.output),
    };
    if let Err(e) = result {
        let msg = format!("{e:#}");
        if cli.log.is_some() {
            log::error!("{msg}");
        }
        eprintln!("runvm: {msg}");
        std::process::exit(1);
    }
}
