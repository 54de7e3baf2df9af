//! Real container engines for the client suite: a private `dockerd` (with the containerd it
//! manages) and a standalone `containerd` (on the host, or inside a test network namespace
//! and a private mount namespace, with `ctr` run in both), each with its own directories
//! and sockets and no change to the host's network setup; a busybox image imported from
//! Debian's busybox-static; and, pass or fail, the end of everything they started (found by
//! pid through their private paths), their mounts, shim sockets and parent cgroups.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{run_with_timeout, Finished, TempDir};

/// Where containerd's shims put their sockets, whatever the daemon's configuration.
const SHIM_SOCKETS: &str = "/run/containerd/s";

/// The Docker CLI: Debian's, which matches the daemon, when it is there.
fn docker_cli() -> PathBuf {
    let debian = Path::new("/usr/bin/docker");
    if debian.exists() {
        debian.into()
    } else {
        "docker".into()
    }
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// Why the client suite cannot run here, or None.
pub fn clients_unavailable() -> Option<String> {
    if let Some(why) = crate::container_test_unavailable() {
        return Some(why);
    }
    for tool in [
        "dockerd",
        "containerd",
        "ctr",
        "containerd-shim-runc-v2",
        "runc",
        "tar",
        "script",
    ] {
        if !on_path(tool) {
            return Some(format!(
                "{tool} is not installed (`make deps` installs docker.io, containerd and runc)"
            ));
        }
    }
    None
}

/// The runvm arguments that name the built kernel and initramfs and the suites' template
/// store (as a daemon.json `runtimeArgs` entry would for an installed runvm).
pub fn asset_args() -> Vec<String> {
    let k = crate::kernel().expect("kernel");
    let i = std::env::var("RUNVM_INITRD").expect("RUNVM_INITRD");
    vec![
        "--kernel".into(),
        k.to_string_lossy().into_owned(),
        "--initrd".into(),
        i,
        "--template-dir".into(),
        crate::shared_templates().to_string_lossy().into_owned(),
    ]
}

/// A daemon this suite started, and the private directory everything of it lives under.
#[derive(Debug)]
pub struct Engine {
    pub dir: TempDir,
    daemon: Option<Child>,
    socket: PathBuf,
    shim_sockets_before: BTreeSet<OsString>,
    cgroups_before: BTreeSet<PathBuf>,
    docker: bool,
    /// containerd runs in namespaces of its own (`containerd_in_netns`): ctr joins them.
    private_ns: bool,
}

/// The parent cgroups engines make for their containers, in every hierarchy: dockerd's
/// `docker` and containerd's `default` (its namespace: `/default/<id>`).
fn parent_cgroups() -> BTreeSet<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|h| h.path())
        .chain([root.to_path_buf()])
        .collect();
    hierarchies
        .iter()
        .flat_map(|h| [h.join("docker"), h.join("default")])
        .filter(|p| p.is_dir())
        .collect()
}

fn shim_sockets() -> BTreeSet<OsString> {
    std::fs::read_dir(SHIM_SOCKETS)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

impl Engine {
    /// Starts `dockerd` with private data and exec roots, on a private socket, without
    /// iptables rules, forwarding or a bridge, with `runvm` registered as `runvm` (and, for
    /// the bad-input test, as `runvm-nokernel` with a kernel path that does not exist).
    pub fn docker() -> Result<Engine, String> {
        Self::start_docker(None)
    }

    /// Starts `dockerd` inside network namespace `netns` (see `netns::TestNet`) with its
    /// default network setup there: the docker0 bridge, NAT and published ports stay in
    /// that namespace.
    pub fn docker_in_netns(netns: &str) -> Result<Engine, String> {
        Self::start_docker(Some(netns))
    }

    fn start_docker(netns: Option<&str>) -> Result<Engine, String> {
        let dir = TempDir::new("docker");
        let runvm = crate::runvm_bin()?;
        let mut bad = asset_args();
        bad[1] = "/nonexistent/vmlinux".into();
        let mut cold = asset_args();
        cold.extend(["--templates".into(), "off".into()]);
        let config = serde_json::json!({
            "runtimes": {
                "runvm": {"path": runvm, "runtimeArgs": asset_args()},
                "runvm-cold": {"path": runvm, "runtimeArgs": cold},
                "runvm-nokernel": {"path": runvm, "runtimeArgs": bad},
            }
        });
        let config_path = dir.path().join("daemon.json");
        std::fs::write(&config_path, config.to_string()).map_err(|e| e.to_string())?;
        let socket = dir.path().join("docker.sock");
        let p = |s: &str| dir.path().join(s);
        let mut cmd = match netns {
            // nsenter enters only the network namespace (`ip netns exec` would also
            // remount /sys, hiding the cgroup file systems from dockerd).
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg("dockerd");
                c
            }
            None => Command::new("dockerd"),
        };
        cmd.arg("--config-file")
            .arg(&config_path)
            .arg("--data-root")
            .arg(p("data"))
            .arg("--exec-root")
            .arg(p("exec"))
            .arg("--pidfile")
            .arg(p("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--storage-driver=overlay2");
        if netns.is_none() {
            cmd.args(["--iptables=false", "--ip-forward=false", "--ip-masq=false"])
                .arg("--bridge=none");
        }
        let e = Engine::spawn(dir, cmd, socket, true)?;
        let ok = wait_until(Duration::from_secs(60), || {
            e.docker_cmd(&["version"], Duration::from_secs(10)).code == Some(0)
        });
        if !ok {
            return Err(format!("dockerd did not come up: {}", e.daemon_log()));
        }
        e.import_busybox()?;
        Ok(e)
    }

    /// Starts a standalone `containerd` (version-2 config: private root, state and
    /// sockets; no CRI plugin).
    pub fn containerd() -> Result<Engine, String> {
        let dir = TempDir::new("containerd");
        let config_path = containerd_config(dir.path())?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config_path);
        Self::start_containerd(dir, cmd, false)
    }

    /// Starts the same `containerd` inside network namespace `netns` (see
    /// `netns::TestNet`) and a private mount namespace, where the shell lines `setup`
    /// returns (given the engine's directory) run first: mounts made there are seen only
    /// by containerd, its shims, runvm and `ctr` (which joins both namespaces), and vanish
    /// with them. nsenter enters the network namespace alone (`ip netns exec` would
    /// remount /sys and hide the cgroup tree).
    pub fn containerd_in_netns(
        netns: &str,
        setup: impl FnOnce(&Path) -> Result<String, String>,
    ) -> Result<Engine, String> {
        let dir = TempDir::new("containerd");
        let config_path = containerd_config(dir.path())?;
        let script = format!(
            "set -e\n{}\nexec nsenter --net=\"$1\" containerd --config \"$2\"\n",
            setup(dir.path())?
        );
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(format!("/var/run/netns/{netns}"))
        .arg(&config_path);
        Self::start_containerd(dir, cmd, true)
    }

    fn start_containerd(dir: TempDir, cmd: Command, private_ns: bool) -> Result<Engine, String> {
        let socket = dir.path().join("containerd.sock");
        let mut e = Engine::spawn(dir, cmd, socket, false)?;
        e.private_ns = private_ns;
        let ok = wait_until(Duration::from_secs(60), || {
            e.ctr(&["version"], Duration::from_secs(10)).code == Some(0)
        });
        if !ok {
            return Err(format!("containerd did not come up: {}", e.daemon_log()));
        }
        Ok(e)
    }

    fn spawn(
        dir: TempDir,
        mut cmd: Command,
        socket: PathBuf,
        docker: bool,
    ) -> Result<Engine, String> {
        let log =
            std::fs::File::create(dir.path().join("daemon.log")).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let shim_sockets_before = shim_sockets();
        let cgroups_before = parent_cgroups();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {cmd:?}: {e}"))?;
        Ok(Engine {
            dir,
            daemon: Some(child),
            socket,
            shim_sockets_before,
            cgroups_before,
            docker,
            private_ns: false,
        })
    }

    /// The daemon's own log, for failure messages.
    pub fn daemon_log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `docker -H <socket> ARGS` as a command.
    pub fn docker_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(docker_cli());
        c.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args);
        c
    }

    /// Runs `docker ARGS` against this daemon.
    pub fn docker_cmd(&self, args: &[&str], timeout: Duration) -> Finished {
        run_with_timeout(self.docker_command(args), timeout)
    }

    /// `ctr -a <socket> ARGS` as a command (in the daemon's namespaces when it has its own).
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut c = match self.pid().filter(|_| self.private_ns) {
            Some(pid) => {
                let mut c = Command::new("nsenter");
                c.args(["-t", &pid.to_string(), "--mount", "--net", "ctr"]);
                c
            }
            None => Command::new("ctr"),
        };
        c.arg("-a").arg(&self.socket).args(args);
        c
    }

    /// Wall time (ms) of `docker run --rm --runtime RUNTIME IMAGE true`, which must succeed.
    pub fn docker_run_true_ms(&self, runtime: &str) -> f64 {
        let t = std::time::Instant::now();
        let f = self.docker_cmd(
            &["run", "--rm", "--runtime", runtime, IMAGE, "true"],
            Duration::from_secs(600),
        );
        assert_eq!(f.code, Some(0), "docker run --runtime {runtime}: {f:?}");
        t.elapsed().as_secs_f64() * 1e3
    }

    /// Runs `ctr -a <socket> ARGS` against this daemon.
    pub fn ctr(&self, args: &[&str], timeout: Duration) -> Finished {
        run_with_timeout(self.ctr_command(args), timeout)
    }

    /// The daemon's mount namespace (`mnt:[INODE]`) while it runs.
    pub fn mount_namespace(&self) -> Option<String> {
        let link = std::fs::read_link(format!("/proc/{}/ns/mnt", self.pid()?)).ok()?;
        Some(link.to_string_lossy().into_owned())
    }

    /// Runs a shell command line with `$DOCKER` naming this daemon's CLI (for pipes and
    /// for `script`, which gives `docker -it` a terminal).
    pub fn shell(&self, line: &str, timeout: Duration) -> Finished {
        let docker = format!(
            "{} -H unix://{}",
            docker_cli().display(),
            self.socket.display()
        );
        let mut c = Command::new("sh");
        c.arg("-c").arg(line).env("DOCKER", docker);
        run_with_timeout(c, timeout)
    }

    /// Builds the `runvm-busybox` image from a busybox rootfs with `docker import`.
    fn import_busybox(&self) -> Result<(), String> {
        let rootfs = self.dir.path().join("image-rootfs");
        crate::busybox_rootfs(&rootfs)?;
        let tar = self.dir.path().join("busybox.tar");
        let t = run_with_timeout(
            {
                let mut c = Command::new("tar");
                c.arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg(".");
                c
            },
            Duration::from_secs(60),
        );
        if t.code != Some(0) {
            return Err(format!("tar: {}", t.stderr));
        }
        let tar_s = tar.to_string_lossy().into_owned();
        let f = self.docker_cmd(
            &["import", "-c", "CMD [\"/bin/sh\"]", &tar_s, IMAGE],
            Duration::from_secs(120),
        );
        if f.code != Some(0) {
            return Err(format!("docker import: {}", f.stderr));
        }
        Ok(())
    }

    /// Writes the image as a `docker save` tarball (for containerd) and returns its path.
    pub fn save_image(&self) -> Result<PathBuf, String> {
        let out = self.dir.path().join("image.tar");
        let out_s = out.to_string_lossy().into_owned();
        let f = self.docker_cmd(&["save", "-o", &out_s, IMAGE], Duration::from_secs(120));
        if f.code != Some(0) {
            return Err(format!("docker save: {}", f.stderr));
        }
        Ok(out)
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.daemon.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILLs the daemon (a daemon dying mid-test) and reaps it; its shims and VMs stay.
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the daemon again with the same configuration (containerd only).
    pub fn restart_containerd(&mut self) -> Result<(), String> {
        assert!(!self.docker && !self.private_ns && self.daemon.is_none());
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| e.to_string())?;
        self.daemon = Some(child);
        if wait_until(Duration::from_secs(60), || {
            self.ctr(&["version"], Duration::from_secs(10)).code == Some(0)
        }) {
            Ok(())
        } else {
            Err(format!(
                "containerd did not come back: {}",
                self.daemon_log()
            ))
        }
    }

    /// Host processes whose command line names this engine's private directory: the
    /// daemon's children (a managed containerd, shims) and runvm's VMMs and exec proxies.
    pub fn leftover_processes(&self) -> Vec<(i32, String)> {
        let marker = format!("{}/", self.dir.path().display());
        let own = std::process::id() as i32;
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if pid == own || Some(pid) == self.pid() || !crate::pid_alive(pid) {
                continue;
            }
            let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(&marker) {
                found.push((pid, cmdline));
            }
        }
        found
    }

    fn stop(&mut self) {
        if self.docker && self.daemon.is_some() {
            let ids = self.docker_cmd(&["ps", "-aq"], Duration::from_secs(30));
            for id in ids.stdout.split_whitespace() {
                let _ = self.docker_cmd(&["rm", "-f", id], Duration::from_secs(60));
            }
        }
        if let Some(mut c) = self.daemon.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever outlived the daemon (shims, VMMs, a managed containerd) goes by pid.
        for _ in 0..3 {
            let left = self.leftover_processes();
            if left.is_empty() {
                break;
            }
            for (pid, _) in left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.unmount_all();
        for name in shim_sockets().difference(&self.shim_sockets_before) {
            let _ = std::fs::remove_file(Path::new(SHIM_SOCKETS).join(name));
        }
        // Parent cgroups this daemon made (an empty one only: rmdir refuses others).
        for dir in parent_cgroups().difference(&self.cgroups_before) {
            let _ = std::fs::remove_dir(dir);
        }
        if self.shim_sockets_before.is_empty() {
            // Only if empty: the shims create both levels.
            let _ = std::fs::remove_dir(SHIM_SOCKETS);
            let _ = std::fs::remove_dir(Path::new(SHIM_SOCKETS).parent().unwrap());
        }
    }

    /// Mount points under the private directory (overlay and shm mounts left by a daemon
    /// that died), deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let marker = format!("{}/", self.dir.path().display());
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&marker))
            .map(PathBuf::from)
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        points
    }

    fn unmount_all(&self) {
        for p in self.mounts() {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The image the suite imports.
pub const IMAGE: &str = "runvm-busybox";

/// Writes a version-2 containerd config (private root, state and sockets under `dir`; no
/// CRI plugin) and returns its path.
fn containerd_config(dir: &Path) -> Result<PathBuf, String> {
    let p = |s: &str| dir.join(s).to_string_lossy().into_owned();
    let socket = p("containerd.sock");
    let config = format!(
        "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         [grpc]\n  address = \"{socket}\"\n[ttrpc]\n  address = \"{socket}.ttrpc\"\n",
        p("root"),
        p("state"),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    Ok(path)
}
