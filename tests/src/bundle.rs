//! Helpers for tests of containers: busybox root file systems, OCI bundles, the runvm
//! binary run on a state root, and guards that delete what a test created.

use std::path::{Path, PathBuf};

use crate::{artifact, busybox, run_with_timeout, runvm_bin, vm_test_unavailable, wait_or_kill};
use crate::{Finished, TempDir};

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
    for applet in crate::busybox_applets()? {
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
        sysctl: Default::default(),
        user_namespace: None,
        rootfs_propagation: None,
        seccomp: None,
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

/// Checks that a live container's state is private: `<root>/<id>` is 0700, nothing in it
/// has group or other bits, and a non-root user (65534), who can run runvm, can neither
/// list the directory, read its console log, nor ask for the container's state or kill it.
pub fn assert_private_state(root: &Path, id: &str) {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = root.join(id);
    // A root anyone may enter, as a shared /run/runvm could be: the container's own
    // directory must be the boundary.
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let m = mode(&e.path());
        assert_eq!(m & 0o077, 0, "{} is {m:o}", e.path().display());
    }
    let nobody = |prog: &Path, args: &[&str]| {
        let mut c = std::process::Command::new(prog);
        c.args(args).uid(65534).gid(65534).env_remove("RUNVM_ROOT");
        run_with_timeout(c, std::time::Duration::from_secs(60))
    };
    let runvm = runvm_bin().unwrap();
    let r = root.to_string_lossy();
    let features = nobody(&runvm, &["features"]);
    assert_eq!(
        features.code,
        Some(0),
        "runvm must run as 65534: {}",
        features.stderr
    );
    let sh = Path::new("/bin/sh");
    let d = dir.to_string_lossy();
    for (what, f) in [
        ("list the state", nobody(sh, &["-c", &format!("ls {d}")])),
        (
            "read the console",
            nobody(sh, &["-c", &format!("cat {d}/console.log")]),
        ),
        (
            "query the state",
            nobody(&runvm, &["--root", &r, "state", id]),
        ),
        ("kill", nobody(&runvm, &["--root", &r, "kill", id, "KILL"])),
    ] {
        assert_ne!(f.code, Some(0), "uid 65534 could {what}: {}", f.stdout);
    }
}
