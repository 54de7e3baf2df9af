//! `runvm events`: statistics of the container (`--stats` once, else every interval until
//! the container stops), as runc's JSON event lines.

use std::time::Duration;

use anyhow::{anyhow, bail};
use runtime_cli::container::Container;
use runtime_cli::state::Status;

use crate::cli::{Cli, EventsArgs};

fn parse_interval(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num.parse().map_err(|_| anyhow!("invalid interval {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        _ => bail!("invalid interval {s:?}"),
    };
    if secs <= 0.0 {
        bail!("invalid interval {s:?}");
    }
    Ok(Duration::from_secs_f64(secs))
}

fn stats_event(c: &Container) -> anyhow::Result<serde_json::Value> {
    let stats = c.stats()?;
    Ok(serde_json::json!({
        "type": "stats",
        "id": c.state.id,
        "data": {
            "cpu": {"usage": {"total": stats.cpu_total_ns}},
            "memory": {"usage": {"usage": stats.memory_rss_bytes, "limit": stats.memory_limit_bytes}},
            "pids": {"current": stats.pids}
        }
    }))
}

pub fn run(cli: &Cli, a: &EventsArgs) -> anyhow::Result<()> {
    let interval = parse_interval(&a.interval)?;
    let c = Container::load(&cli.globals.root, &a.id)?;
    if matches!(c.status(), Status::Stopped | Status::Creating) {
        bail!("container {} is not running", a.id);
    }
    if a.stats {
        println!("{}", stats_event(&c)?);
        return Ok(());
    }
    while c.status() != Status::Stopped {
        match stats_event(&c) {
            Ok(e) => println!("{e}"),
            Err(_) if c.status() == Status::Stopped => break,
            Err(e) => return Err(e),
        }
        std::thread::sleep(interval);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_interval("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_interval("2").unwrap(), Duration::from_secs(2));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("fast").is_err());
    }
}
