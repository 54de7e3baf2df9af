//! Helpers shared by runvm's end-to-end tests: locating the built artifacts (kernel, test
//! init, runvm binary), skipping clearly when the host cannot run a VM, and temporary
//! directories that clean up after themselves.

use std::path::{Path, PathBuf};

pub mod clients;

/// Why a VM test cannot run here, or None if it can.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened ({e})")),
    }
}

/// Skips the calling test (returns from it) when `$reason` yields a reason: the reason
/// goes to stderr and, when `RUNVM_TEST_SKIP_LOG` names a file, into it (`make test`
/// prints that file at the end). `RUNVM_TEST_STRICT=1` turns a skip into a failure.
#[macro_export]
macro_rules! skip_unless {
    ($reason:expr) => {
        if let Some(why) = $reason {
            $crate::record_skip(module_path!(), &why);
            return;
        }
    };
}

/// Reports a skipped test; panics instead under `RUNVM_TEST_STRICT=1`.
pub fn record_skip(test: &str, why: &str) {
    if std::env::var("RUNVM_TEST_STRICT").as_deref() == Ok("1") {
        panic!("required test {test} cannot run: {why}");
    }
    let line = format!("SKIPPED {test}: {why}\n");
    eprint!("{line}");
    if let Some(log) = std::env::var_os("RUNVM_TEST_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// A file named by an environment variable that `make test` sets.
fn artifact(var: &str, what: &str) -> Result<PathBuf, String> {
    match std::env::var_os(var) {
        Some(p) if Path::new(&p).exists() => Ok(PathBuf::from(p)),
        Some(p) => Err(format!(
            "{what} {} ({var}) does not exist",
            Path::new(&p).display()
        )),
        None => Err(format!(
            "{var} is not set: run the tests with `make test`, which builds the {what}"
        )),
    }
}

/// The guest kernel built by `kernel-config/build.sh`.
pub fn kernel() -> Result<PathBuf, String> {
    artifact("RUNVM_KERNEL", "guest kernel")
}

/// A static test program (`tests/src/bin/`) from `RUNVM_TEST_BINS`, where `make test`
/// builds them with `+crt-static` so they run in a guest with nothing else.
pub fn static_test_bin(name: &str) -> Result<PathBuf, String> {
    let dir = artifact("RUNVM_TEST_BINS", "static test programs directory")?;
    let p = dir.join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!("static test program {} is missing", p.display()))
    }
}

/// The static boot-check init.
pub fn boot_check_init() -> Result<PathBuf, String> {
    static_test_bin("boot-check-init")
}

/// Debian's static busybox, for guests that need a shell and tools.
pub fn busybox() -> Result<PathBuf, String> {
    let p = PathBuf::from("/bin/busybox");
    if p.exists() {
        Ok(p)
    } else {
        Err("/bin/busybox is missing (apt-get install busybox-static; `make test` does)".into())
    }
}

/// An initramfs whose `/init` is the guest agent, with busybox and its applets, and the
/// given extra files (guest path, host path).
pub fn agent_initramfs(extra: &[(&str, &Path)]) -> Result<Vec<u8>, String> {
    let agent = agent_bin()?;
    let bb = busybox()?;
    let mut image = vmm::initramfs::Initramfs::new();
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
    let list = std::process::Command::new(&bb)
        .arg("--list-full")
        .output()
        .map_err(|e| format!("busybox --list-full: {e}"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "bin/busybox" {
            image.symlink(applet, "/bin/busybox");
        }
    }
    for (guest, host) in extra {
        image
            .file_from(guest, 0o755, host)
            .map_err(|e| format!("{}: {e}", host.display()))?;
    }
    Ok(image.to_bytes())
}

/// The runvm binary under test.
pub fn runvm_bin() -> Result<PathBuf, String> {
    if std::env::var_os("RUNVM_BIN").is_some() {
        return artifact("RUNVM_BIN", "runvm binary");
    }
    // target/<profile>/deps/<test> -> target/<profile>/runvm
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("runvm"))
        .ok_or("no target directory")?;
    if candidate.exists() {
        Ok(candidate)
    } else {
        Err(format!("runvm binary not built at {}", candidate.display()))
    }
}

/// Everything a boot test needs, or the reason it cannot run.
pub fn vm_test_unavailable() -> Option<String> {
    kvm_unavailable()
        .or_else(|| kernel().err())
        .or_else(|| runvm_bin().err())
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "runvm-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("creating temp dir");
        TempDir(p)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A token unlikely to appear by chance, for proving data made the round trip.
pub fn token() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("tok{:x}{:x}", t.as_nanos(), std::process::id())
}

/// What a finished command printed and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

/// Waits for `child` up to `timeout`, then kills it; returns its status and whether it
/// was killed. The child is only signalled while unreaped, so its pid cannot be reused.
fn wait_or_kill(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> (std::process::ExitStatus, bool) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("waiting for command") {
            return (st, false);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            return (child.wait().expect("waiting for killed command"), true);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Asserts that a command succeeded (exit 0, in time); returns it.
pub fn ok<'a>(f: &'a Finished, what: &str) -> &'a Finished {
    assert!(
        f.code == Some(0) && !f.timed_out,
        "{what}: exit {:?} (timed out: {})\nstdout: {}\nstderr: {}",
        f.code,
        f.timed_out,
        f.stdout,
        f.stderr
    );
    f
}

/// Asserts that a runvm command failed with one `runvm: ...` line containing `needle`.
pub fn fails_with(f: &Finished, needle: &str) {
    assert_ne!(
        f.code,
        Some(0),
        "expected failure containing {needle:?}, stdout: {}",
        f.stdout
    );
    let err = f.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "one line expected:\n{err}");
    assert!(err.starts_with("runvm: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
}

/// Runs `cmd` to completion with piped stdout/stderr and no stdin; kills it (and reports
/// `timed_out`) if it runs longer than `timeout`. The child is only ever signalled while it
/// is still unreaped, so its pid cannot have been reused.
pub fn run_with_timeout(mut cmd: std::process::Command, timeout: std::time::Duration) -> Finished {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning command under test");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let (status, timed_out) = wait_or_kill(&mut child, timeout);
    Finished {
        code: status.code(),
        stdout: String::from_utf8_lossy(&out_t.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_t.join().unwrap()).into_owned(),
        timed_out,
    }
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

/// Fills `root` with a minimal busybox system: Debian's static busybox with its applets,
/// `/etc/passwd` and `/etc/group` with root and `user` (1000), and the usual empty
/// directories. Returns `root`.
pub fn busybox_rootfs(root: &Path) -> Result<&Path, String> {
    use std::os::unix::fs::PermissionsExt;
    let bb = busybox()?;
    let io = |e: std::io::Error| e.to_string();
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "tmp",
        "proc",
        "sys",
        "dev",
        "root",
        "home/user",
        "var/tmp",
        "run",
    ] {
        std::fs::create_dir_all(root.join(d)).map_err(io)?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .map_err(io)?;
    std::fs::copy(&bb, root.join("bin/busybox")).map_err(io)?;
    let list = std::process::Command::new(&bb)
        .arg("--list-full")
        .output()
        .map_err(|e| format!("busybox --list-full: {e}"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        let link = root.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link).map_err(io)?;
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .map_err(io)?;
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nusers:x:100:\nuser:x:1000:\nnogroup:x:65534:\n",
    )
    .map_err(io)?;
    Ok(root)
}

/// The mounts, masked and read-only paths `runvm spec` puts in a default config, as the
/// agent receives them.
pub fn default_container_spec(share: agent_protocol::Share) -> agent_protocol::ContainerSpec {
    let m = |dest: &str, kind: &str, opts: &[&str]| agent_protocol::Mount {
        destination: dest.into(),
        kind: kind.into(),
        source: kind.into(),
        options: opts.iter().map(|s| s.to_string()).collect(),
        share_source: false,
    };
    agent_protocol::ContainerSpec {
        share,
        rootfs: "rootfs".into(),
        readonly: false,
        hostname: Some("runvm".into()),
        mounts: vec![
            m("/proc", "proc", &["nosuid", "noexec", "nodev"]),
            m(
                "/dev",
                "tmpfs",
                &["nosuid", "strictatime", "mode=755", "size=65536k"],
            ),
            m(
                "/dev/pts",
                "devpts",
                &[
                    "nosuid",
                    "noexec",
                    "newinstance",
                    "ptmxmode=0666",
                    "mode=0620",
                    "gid=5",
                ],
            ),
            m(
                "/dev/shm",
                "tmpfs",
                &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            ),
            m("/dev/mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
            m("/sys", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
        ],
        masked_paths: [
            "/proc/kcore",
            "/proc/keys",
            "/proc/timer_list",
            "/sys/firmware",
        ]
        .map(String::from)
        .to_vec(),
        readonly_paths: [
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ]
        .map(String::from)
        .to_vec(),
        devices: Vec::new(),
        no_pivot: false,
    }
}

/// An OCI bundle for tests: a busybox rootfs and runvm's default config (no terminal)
/// running `args`, in a temporary directory removed on drop.
#[derive(Debug)]
pub struct TestBundle {
    dir: TempDir,
    config: serde_json::Value,
}

impl TestBundle {
    /// A bundle running `args`.
    pub fn new(tag: &str, args: &[&str]) -> Self {
        let dir = TempDir::new(tag);
        busybox_rootfs(&dir.path().join("rootfs")).expect("busybox rootfs");
        let out = std::process::Command::new(runvm_bin().expect("runvm binary"))
            .args(["spec", "--bundle"])
            .arg(dir.path())
            .output()
            .expect("runvm spec");
        assert!(
            out.status.success(),
            "runvm spec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        config["process"]["terminal"] = false.into();
        config["process"]["args"] = args.iter().map(|a| serde_json::Value::from(*a)).collect();
        let b = TestBundle { dir, config };
        b.save();
        b
    }

    fn save(&self) {
        std::fs::write(self.dir.path().join("config.json"), self.config.to_string()).unwrap();
    }

    /// Changes config.json.
    pub fn edit(&mut self, f: impl FnOnce(&mut serde_json::Value)) -> &mut Self {
        f(&mut self.config);
        self.save();
        self
    }

    /// The bundle directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Its rootfs.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

/// Runs the runvm binary with `--root root` and `args`.
pub fn runvm(root: &Path, args: &[&str], timeout: std::time::Duration) -> Finished {
    let mut c = std::process::Command::new(runvm_bin().expect("runvm binary"));
    c.arg("--root").arg(root).args(args);
    run_with_timeout(c, timeout)
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rfind(')')
                .map(|i| !s[i + 2..].starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// What the guest needs besides /dev/kvm: the kernel, the runvm binary and the installed
/// agent initramfs (`make` puts it next to runvm).
pub fn container_test_unavailable() -> Option<String> {
    vm_test_unavailable()
        .or_else(|| busybox().err())
        .or_else(|| artifact("RUNVM_INITRD", "agent initramfs").err())
}

/// Deletes a container (with --force) when dropped, so a failing test leaves no VM.
#[derive(Debug)]
pub struct ContainerGuard {
    root: PathBuf,
    ids: Vec<String>,
}

impl ContainerGuard {
    /// Guards containers `ids` under `root`.
    pub fn new(root: &Path, ids: &[&str]) -> Self {
        ContainerGuard {
            root: root.to_path_buf(),
            ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        for id in &self.ids {
            if self.root.join(id).exists() {
                let _ = runvm(
                    &self.root,
                    &["delete", "--force", id],
                    std::time::Duration::from_secs(60),
                );
            }
        }
    }
}

/// Runs a runvm command whose detached VMM inherits its stdout and stderr (`create`,
/// `run --detach`): they go to files (`out_path`, and `<out_path>.err`), which keep
/// receiving the container's output after the command returns.
pub fn runvm_to_files(
    root: &Path,
    args: &[&str],
    out_path: &Path,
    timeout: std::time::Duration,
) -> Finished {
    let out = std::fs::File::create(out_path).expect("creating output file");
    let err_path = out_path.with_extension("err");
    let err = std::fs::File::create(&err_path).expect("creating error file");
    let mut child = std::process::Command::new(runvm_bin().expect("runvm binary"))
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawning runvm");
    let (status, timed_out) = wait_or_kill(&mut child, timeout);
    Finished {
        code: status.code(),
        stdout: std::fs::read_to_string(out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        timed_out,
    }
}

/// The median of benchmark samples (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs per benchmark case: `BENCH_RUNS`, else `default`.
pub fn bench_runs(default: usize) -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
