//! Helpers shared by runvm's end-to-end tests: locating the built artifacts (kernel, test
//! init, runvm binary), skipping clearly when the host cannot run a VM, and temporary
//! directories that clean up after themselves.

use std::path::{Path, PathBuf};

pub mod agent;
pub mod bundle;
pub mod clients;
pub mod cni;
pub mod host_container;
pub mod netns;
pub mod watchdog;

pub use agent::*;
pub use bundle::*;

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
pub fn artifact(var: &str, what: &str) -> Result<PathBuf, String> {
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

/// The applets of Debian's static busybox, as paths relative to `/` (`bin/sh`, ...),
/// busybox itself left out.
pub fn busybox_applets() -> Result<Vec<String>, String> {
    let list = std::process::Command::new(busybox()?)
        .arg("--list-full")
        .output()
        .map_err(|e| format!("busybox --list-full: {e}"))?;
    Ok(String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "bin/busybox")
        .map(String::from)
        .collect())
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
/// Arms the binary's [`watchdog`] as well: every VM test passes through here, and so
/// does the choice of template store ([`shared_templates`]).
pub fn vm_test_unavailable() -> Option<String> {
    watchdog::arm();
    shared_templates();
    kvm_unavailable()
        .or_else(|| kernel().err())
        .or_else(|| runvm_bin().err())
}

/// The suites' VMs start from templates (runvm's default), all from one store:
/// `RUNVM_TEMPLATE_DIR` (`make test` sets it and makes the default shape's template
/// first), or `runvm-test-templates` in the system temp dir, so that every runvm these
/// tests start (directly, or through Docker and containerd, which pass their environment
/// on) shares it instead of making one per test root.
pub fn shared_templates() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| match std::env::var_os("RUNVM_TEMPLATE_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let d = std::env::temp_dir().join("runvm-test-templates");
            // Before any runvm of this binary starts (each test passes through here
            // first); the variable is read by the runvm processes, never by this one.
            std::env::set_var("RUNVM_TEMPLATE_DIR", &d);
            d
        }
    })
    .clone()
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

/// A tmpfs of a few MiB mounted for a test (a file system that fills up), unmounted on
/// drop.
#[derive(Debug)]
pub struct SmallDisk {
    dir: PathBuf,
    _made: Option<TempDir>,
}

impl SmallDisk {
    /// A `mib` MiB tmpfs, mode 0700, on a new directory.
    pub fn new(mib: u32) -> Self {
        let made = TempDir::new("small-disk");
        let mut disk = Self::on(made.path(), mib);
        disk._made = Some(made);
        disk
    }

    /// A `mib` MiB tmpfs, mode 0700, on `dir`.
    pub fn on(dir: &Path, mib: u32) -> Self {
        let data = format!("size={mib}m,mode=0700");
        nix::mount::mount(
            Some("runvm-test"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .expect("mounting a tmpfs");
        SmallDisk {
            dir: dir.to_path_buf(),
            _made: None,
        }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes `name` in it until it is full.
    pub fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.join(name)).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.write_all(&[0]);
    }
}

impl Drop for SmallDisk {
    /// Unmounts it (before the directory made for it, if any, is removed).
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Field `name` of /proc/PID/status (its value, trimmed), if the process is there.
pub fn proc_status(pid: i32, name: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
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
pub(crate) fn wait_or_kill(
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
