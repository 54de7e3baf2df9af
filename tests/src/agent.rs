//! Helpers for tests of the guest agent: the agent binary, an agent running on the host,
//! an agent initramfs, and writers that capture or check what a process printed.

use std::path::{Path, PathBuf};

use crate::{artifact, busybox, busybox_applets, TempDir};

/// An initramfs whose `/init` is the guest agent, with busybox and its applets, and the
/// given extra files (guest path, host path).
pub fn agent_initramfs(extra: &[(&str, &Path)]) -> Result<Vec<u8>, String> {
    let agent = agent_bin()?;
    let bb = busybox()?;
    let mut image = runtime_cli::initramfs::Initramfs::new();
    image.base_layout();
    for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "root"] {
        image.dir(d, 0o755);
    }
    image
        .file_from("init", 0o755, &agent)
        .map_err(|e| e.to_string())?;
    image
        .file_from("bin/busybox", 0o755, &bb)
        .map_err(|e| e.to_string())?;
    for applet in busybox_applets()? {
        image.symlink(&applet, "/bin/busybox");
    }
    for (guest, host) in extra {
        image
            .file_from(guest, 0o755, host)
            .map_err(|e| format!("{}: {e}", host.display()))?;
    }
    Ok(image.to_bytes())
}

/// The guest agent binary: the static one `make test` builds (`RUNVM_AGENT`), else the
/// workspace build next to the test executable.
pub fn agent_bin() -> Result<PathBuf, String> {
    if std::env::var_os("RUNVM_AGENT").is_some() {
        return artifact("RUNVM_AGENT", "guest agent");
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("runvm-agent"))
        .ok_or("no target directory")?;
    if candidate.exists() {
        Ok(candidate)
    } else {
        Err(format!("runvm-agent not built at {}", candidate.display()))
    }
}

/// A guest agent running on the host (`--listen unix:PATH`), killed and reaped on drop.
#[derive(Debug)]
pub struct HostAgent {
    child: std::process::Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl HostAgent {
    /// Starts an agent and waits for its socket.
    pub fn start() -> Self {
        let dir = TempDir::new("agent");
        let socket = dir.path().join("agent.sock");
        let child = std::process::Command::new(agent_bin().expect("agent binary"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("starting runvm-agent");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "agent socket never appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        HostAgent {
            child,
            socket,
            _dir: dir,
        }
    }

    /// The agent's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A client for it.
    pub fn client(&self) -> runtime_cli::agent_client::AgentClient {
        runtime_cli::agent_client::AgentClient::new(std::sync::Arc::new(
            runtime_cli::agent_client::UnixDialer(self.socket.clone()),
        ))
    }

    /// Whether the agent process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `Write` that collects into a shared buffer (for capturing a process's output).
#[derive(Clone, Debug, Default)]
pub struct Capture(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Capture {
    /// What was written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }

    /// What was written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
}

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Byte at position `i` of the test stream pattern (`tests/src/bin/pattern.rs`): depends on
/// the position, so loss, duplication and reordering all show.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (i >> 16) as u8
}

/// A `Write` that checks everything written against the test pattern as it arrives,
/// without keeping it.
#[derive(Clone, Debug, Default)]
pub struct PatternCheck(pub std::sync::Arc<std::sync::Mutex<(u64, Option<u64>)>>);

impl PatternCheck {
    /// Bytes seen, and the position of the first wrong byte if any.
    pub fn result(&self) -> (u64, Option<u64>) {
        *self.0.lock().unwrap()
    }
}

impl std::io::Write for PatternCheck {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut s = self.0.lock().unwrap();
        if s.1.is_none() {
            if let Some(k) = b
                .iter()
                .enumerate()
                .position(|(k, x)| *x != pattern_byte(s.0 + k as u64))
            {
                s.1 = Some(s.0 + k as u64);
            }
        }
        s.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
