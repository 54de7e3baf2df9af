//! `runvm`: the OCI runtime command line. Parses flags, sets up logging and dispatches to
//! one module per verb; errors end as one line on stderr (and in the `--log` file).

mod cli;
mod cmd;

use clap::Parser;
use runtime_cli::logging;

/// Runs the verb; `Ok(Some(status))` for verbs that exit with a process's status.
fn dispatch(cli: &cli::Cli) -> anyhow::Result<Option<i32>> {
    use cli::Command as C;
    Ok(match &cli.command {
        C::Create(a) => cmd::create::run(cli, a).map(|_| None)?,
        C::Start(a) => cmd::start::run(cli, a).map(|_| None)?,
        C::State(a) => cmd::state::run(cli, a).map(|_| None)?,
        C::Kill(a) => cmd::kill::run(cli, a).map(|_| None)?,
        C::Delete(a) => cmd::delete::run(cli, a).map(|_| None)?,
        C::Run(a) => Some(cmd::run::run(cli, a)?),
        C::Exec(a) => Some(cmd::exec::run(cli, a)?),
        C::Ps(a) => cmd::ps::run(cli, a).map(|_| None)?,
        C::List(a) => cmd::list::run(cli, a).map(|_| None)?,
        C::Pause(a) => cmd::pause::run(cli, a, true).map(|_| None)?,
        C::Resume(a) => cmd::pause::run(cli, a, false).map(|_| None)?,
        C::Events(a) => cmd::events::run(cli, a).map(|_| None)?,
        C::Features => cmd::features::run().map(|_| None)?,
        C::Spec(a) => cmd::spec::run(a).map(|_| None)?,
        C::Update(a) => cmd::update::run(cli, a).map(|_| None)?,
        C::Boot(a) => cmd::boot::run(cli, a).map(|_| None)?,
        C::VmRun(a) => Some(cmd::vm_run::run(cli, a)?),
        C::Template(a) => cmd::template::run(cli, a).map(|_| None)?,
        C::Initramfs(a) => {
            runtime_cli::initramfs::write_agent_initramfs(&a.agent, &a.output).map(|_| None)?
        }
        C::VmmServe(a) => Some(cmd::vmm_serve::run(cli, a)),
    })
}

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
    let g = &cli.globals;
    if let Err(e) = logging::init(g.log.as_deref(), g.log_format, g.debug) {
        eprintln!("runvm: cannot open log file: {e}");
        std::process::exit(1);
    }
    match dispatch(&cli) {
        Ok(None) => {}
        Ok(Some(status)) => std::process::exit(status),
        Err(e) => {
            let msg = logging::error_line(e.as_ref());
            if cli.globals.log.is_some() {
                log::error!("{msg}");
            }
            eprintln!("runvm: {msg}");
            std::process::exit(1);
        }
    }
}
