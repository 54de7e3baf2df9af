//! `runvm list`: the containers under --root.

use runtime_cli::container::Container;
use runtime_cli::state::list_ids;

use crate::cli::{Cli, Format, ListArgs};

pub fn run(cli: &Cli, a: &ListArgs) -> anyhow::Result<()> {
    let containers: Vec<Container> = list_ids(&cli.globals.root)
        .iter()
        .filter_map(|id| Container::load(&cli.globals.root, id).ok())
        .collect();
    if a.quiet {
        for c in &containers {
            println!("{}", c.state.id);
        }
        return Ok(());
    }
    match a.format {
        Format::Json => {
            let v: Vec<serde_json::Value> =
                containers.iter().map(|c| c.state.to_output()).collect();
            println!("{}", serde_json::to_string(&v)?);
        }
        Format::Table => {
            println!(
                "{:<24} {:<10} {:<10} {:<40} {:<32} OWNER",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for c in &containers {
                let o = c.state.to_output();
                println!(
                    "{:<24} {:<10} {:<10} {:<40} {:<32} {}",
                    c.state.id,
                    o["pid"].to_string(),
                    c.status(),
                    c.state.bundle.display(),
                    c.state.created,
                    c.state.owner
                );
            }
        }
    }
    Ok(())
}
