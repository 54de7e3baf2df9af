//! runvm's logger: the `log` facade written to stderr or to the `--log` file, as text or as
//! the JSON lines (`{"level","msg","time"}`) that Docker and containerd read back.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// The descriptor of the `--log` file the logger writes to (-1: none).
static FILE_FD: AtomicI32 = AtomicI32::new(-1);

/// The descriptor the logger writes its file through, if it writes to one: a process
/// that closes what it inherited must keep it.
pub fn file_fd() -> Option<std::os::fd::RawFd> {
    Some(FILE_FD.load(Ordering::Relaxed)).filter(|&fd| fd >= 0)
}

/// Output format of log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

struct Logger {
    level: log::LevelFilter,
    format: LogFormat,
    file: Option<Mutex<File>>,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(self.format, record.level(), &record.args().to_string());
        match &self.file {
            Some(f) => {
                let _ = crate::util::lock(f).write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// One log line, newline included.
pub fn format_line(format: LogFormat, level: log::Level, msg: &str) -> String {
    match format {
        LogFormat::Text => format!(
            "runvm[{}]: {}: {msg}\n",
            std::process::id(),
            level.as_str().to_lowercase()
        ),
        LogFormat::Json => {
            let v = serde_json::json!({
                "level": level.as_str().to_lowercase(),
                "msg": msg,
                "time": rfc3339_now(),
            });
            format!("{v}\n")
        }
    }
}

/// The current UTC time as RFC 3339 with nanoseconds.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

pub use agent_protocol::error_line;

/// Installs the logger. With a log file, every message at `level` or above goes there;
/// without one, to stderr.
pub fn init(log_file: Option<&Path>, format: LogFormat, debug: bool) -> std::io::Result<()> {
    let file = match log_file {
        Some(p) => Some(OpenOptions::new().create(true).append(true).open(p)?),
        None => None,
    };
    let raw = file.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let file = file.map(Mutex::new);
    let level = if debug {
        log::LevelFilter::Debug
    } else if file.is_some() {
        log::LevelFilter::Info
    } else {
        log::LevelFilter::Warn
    };
    let logger = Logger {
        level,
        format,
        file,
    };
    // A second init (tests) keeps the first logger.
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
        // The logger keeps the file open for good: a VMM ended by its seccomp filter
        // says why there too.
        if let Some(fd) = raw {
            FILE_FD.store(fd, Ordering::Relaxed);
            vmm::seccomp::report_to(fd, format == LogFormat::Json);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = rfc3339_now();
        assert!(humantime::parse_rfc3339(&t).is_ok(), "{t}");
        assert!(t.ends_with('Z') && t.len() == "2026-11-28T17:42:43.000000000Z".len());
    }

    #[test]
    fn json_lines_parse_back() {
        let l = format_line(LogFormat::Json, log::Level::Error, "bad \"thing\"");
        assert!(l.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(l.trim_end()).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "bad \"thing\"");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
}
