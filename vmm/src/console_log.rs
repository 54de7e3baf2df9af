//! The console log file: the guest writes to its UART without end if it wants, so the
//! file is capped. When it reaches its limit it becomes `<path>.1` (replacing an older
//! one) and a new file starts, so the log never takes more than twice the limit on disk
//! and always holds the latest output. Both files are the VMM's alone (mode 0600, not
//! followed through a symlink), whatever the process umask is.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The size at which the console log rotates.
pub const CONSOLE_LOG_LIMIT: u64 = 1 << 20;

/// A capped, rotating log file.
#[derive(Debug)]
pub struct ConsoleLog {
    path: PathBuf,
    file: File,
    written: u64,
    limit: u64,
}

fn open(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)?;
    // An existing file keeps its mode on open: make it private too.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(f)
}

impl ConsoleLog {
    /// Opens (appends to) `path`, rotating at `limit` bytes.
    pub fn open(path: &Path, limit: u64) -> std::io::Result<Self> {
        let file = open(path)?;
        let written = file.metadata()?.len();
        Ok(ConsoleLog {
            path: path.to_path_buf(),
            file,
            written,
            limit: limit.max(1),
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written >= self.limit {
            self.rotate()?;
        }
        let room = (self.limit - self.written) as usize;
        let n = self.file.write(&buf[..buf.len().min(room)])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn output_without_end_stays_within_twice_the_limit_and_keeps_the_latest() {
        let dir = std::env::temp_dir().join(format!("runvm-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut log = ConsoleLog::open(&path, 4096).unwrap();
        for i in 0..10_000u32 {
            log.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        let cur = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::metadata(dir.join("console.log.1")).unwrap();
        assert!(
            cur.len() <= 4096 && old.len() == 4096,
            "{} {}",
            cur.len(),
            old.len()
        );
        assert!(cur.ends_with("line 9999\n"), "latest output kept");
        for p in [path.clone(), dir.join("console.log.1")] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_in_its_place_is_not_followed() {
        let dir = std::env::temp_dir().join(format!("runvm-console-l-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("elsewhere");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("console.log")).unwrap();
        assert!(ConsoleLog::open(&dir.join("console.log"), 10).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
