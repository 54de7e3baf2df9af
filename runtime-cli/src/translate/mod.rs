//! Translation of an OCI bundle into what runvm runs: the VM's size and kernel, the
//! container's file-system plan for the agent (bind sources moved into the share), the
//! host paths the share must expose, and the process.

use std::path::{Path, PathBuf};

use agent_protocol::{ConsoleSize, ContainerSpec, Device, Mount, ProcessSpec, Rlimit, Share, User};
use oci_spec::runtime::LinuxDeviceType;
use vmm::{ConsoleOutput, VmConfig};

mod isolation;

pub use isolation::{VmmNamespace, VmmNamespaces};

use crate::assets::Assets;
use crate::bundle::Bundle;

/// virtio-fs tag of the container share.
pub const SHARE_TAG: &str = "runvm";
/// Share entry of the rootfs.
pub const SHARE_ROOTFS: &str = "rootfs";

/// Errors translating a bundle.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error("mount {destination}: {reason}")]
    Mount { destination: String, reason: String },
    #[error("memory limit of {bytes} bytes is below runvm's minimum guest of {min} MiB")]
    MemoryTooSmall { bytes: i64, min: u64 },
    #[error("{0}")]
    Invalid(String),
}

/// A host path exposed in the share at `mounts/<index>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareBind {
    pub index: usize,
    pub source: PathBuf,
    pub readonly: bool,
}

impl ShareBind {
    /// Path inside the share.
    pub fn share_path(&self) -> String {
        format!("mounts/{}", self.index)
    }
}

/// How big the VM is and what it boots, from `linux.resources` and the `vm` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmSizing {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub kernel_params: String,
}

/// Everything runvm needs from a bundle.
#[derive(Clone, Debug)]
pub struct Plan {
    pub sizing: VmSizing,
    pub process: ProcessSpec,
    pub container: ContainerSpec,
    pub rootfs: PathBuf,
    pub binds: Vec<ShareBind>,
    /// `linux.cgroupsPath`, or a path of runvm's for the container.
    pub cgroups_path: String,
    /// The limits of the VMM's cgroup.
    pub resources: oci_spec::runtime::LinuxResources,
    /// `linux.resources.memory.limit` as the spec gives it (the guest's RAM).
    pub memory_limit: Option<i64>,
    /// The namespaces the VMM process takes (see [`VmmNamespaces`]).
    pub namespaces: VmmNamespaces,
    /// Whether the VM may come from a template (annotation [`TEMPLATE_ANNOTATION`]).
    pub template: bool,
}

/// The annotation that keeps a container off templates (`"false"`; `"true"` is the
/// default).
pub const TEMPLATE_ANNOTATION: &str = "run.oci.runvm.template";

fn template_allowed(bundle: &Bundle) -> Result<bool, TranslateError> {
    let value = bundle
        .spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(TEMPLATE_ANNOTATION).cloned());
    match value.as_deref() {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(TranslateError::Invalid(format!(
            "annotation {TEMPLATE_ANNOTATION}={other:?}: \"true\" or \"false\" expected"
        ))),
    }
}

fn is_bind(kind: &str, options: &[String]) -> bool {
    kind == "bind" || options.iter().any(|o| o == "bind" || o == "rbind")
}

fn parse_cpuset_count(cpus: &str) -> Option<u64> {
    let mut n = 0;
    for part in cpus.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                n += b.checked_sub(a)? + 1;
            }
            None => {
                part.trim().parse::<u64>().ok()?;
                n += 1;
            }
        }
    }
    (n > 0).then_some(n)
}

fn sizing(bundle: &Bundle) -> Result<VmSizing, TranslateError> {
    let mut s = VmSizing {
        mem_mib: vmm::config::DEFAULT_MEM_MIB,
        vcpus: 1,
        ..Default::default()
    };
    let resources = bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().clone());
    if let Some(r) = &resources {
        if let Some(limit) = r.memory().as_ref().and_then(|m| m.limit()) {
            if limit > 0 {
                let mib = (limit as u64).div_ceil(1 << 20);
                if mib < vmm::config::MIN_MEM_MIB {
                    return Err(TranslateError::MemoryTooSmall {
                        bytes: limit,
                        min: vmm::config::MIN_MEM_MIB,
                    });
                }
                s.mem_mib = mib;
            }
        }
        if let Some(cpu) = r.cpu() {
            let from_quota = match (cpu.quota(), cpu.period()) {
                (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p)),
                _ => None,
            };
            let from_set = cpu.cpus().as_deref().and_then(parse_cpuset_count);
            if let Some(n) = from_quota.or(from_set) {
                s.vcpus = n.clamp(1, u64::from(vmm::config::MAX_VCPUS)) as u8;
            }
        }
    }
    if let Some(vm) = bundle.spec.vm() {
        s.kernel = Some(vm.kernel().path().clone());
        s.kernel_params = vm
            .kernel()
            .parameters()
            .clone()
            .unwrap_or_default()
            .join(" ");
        s.initrd = vm.kernel().initrd().clone().map(PathBuf::from);
    }
    // vm.hwConfig (newer spec than the typed one): vcpus and memory (MiB).
    let hw = &bundle.raw["vm"]["hwConfig"];
    if let Some(v) = hw["vcpus"].as_u64() {
        s.vcpus = v.clamp(1, u64::from(vmm::config::MAX_VCPUS)) as u8;
    }
    if let Some(m) = hw["memory"].as_u64() {
        s.mem_mib = m.max(vmm::config::MIN_MEM_MIB);
    }
    Ok(s)
}

fn process(bundle: &Bundle) -> Result<ProcessSpec, TranslateError> {
    let p = bundle
        .spec
        .process()
        .as_ref()
        .ok_or_else(|| TranslateError::Invalid("config has no process".into()))?;
    Ok(process_spec(p))
}

/// The agent's view of an OCI process.
pub fn process_spec(p: &oci_spec::runtime::Process) -> ProcessSpec {
    let user = p.user();
    ProcessSpec {
        args: p.args().clone().unwrap_or_default(),
        env: p.env().clone().unwrap_or_default(),
        cwd: p.cwd().to_string_lossy().into_owned(),
        user: User {
            uid: user.uid(),
            gid: user.gid(),
            umask: user.umask(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
        },
        terminal: p.terminal().unwrap_or(false),
        console_size: p.console_size().map(|c| ConsoleSize {
            height: c.height() as u16,
            width: c.width() as u16,
        }),
        rlimits: p
            .rlimits()
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|r| Rlimit {
                kind: serde_json::to_value(r.typ())
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                soft: r.soft(),
                hard: r.hard(),
            })
            .collect(),
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        oom_score_adj: p.oom_score_adj(),
        capabilities: isolation::capabilities(p),
    }
}

/// What the VMM's cgroup gets (see [`crate::cgroup::host_resources`]).
fn resources(
    linux: &oci_spec::runtime::Linux,
    sizing: &VmSizing,
) -> Result<oci_spec::runtime::LinuxResources, TranslateError> {
    let guest = i64::try_from(sizing.mem_mib << 20).unwrap_or(i64::MAX);
    crate::cgroup::host_resources(linux.resources().as_ref(), guest)
        .map_err(|e| TranslateError::Invalid(format!("linux.resources: {e}")))
}

impl Plan {
    /// The VM this plan runs in: `assets` booted with the plan's size and kernel
    /// parameters, the console going to `console`. The shape never depends on anything
    /// else of the container.
    pub fn vm_config(&self, assets: &Assets, console: ConsoleOutput) -> VmConfig {
        let mut vm = VmConfig::new(&assets.kernel);
        vm.initrd = Some(assets.initrd.clone());
        vm.mem_mib = self.sizing.mem_mib;
        vm.vcpus = self.sizing.vcpus;
        vm.cmdline = self.sizing.kernel_params.clone();
        vm.console = console;
        vm
    }

    /// The kernel and initramfs: an explicit path first, then the bundle's `vm` section,
    /// then the environment and install paths.
    pub fn assets(
        &self,
        kernel: Option<&Path>,
        initrd: Option<&Path>,
    ) -> Result<Assets, crate::assets::AssetError> {
        Assets::resolve(
            kernel.or(self.sizing.kernel.as_deref()),
            initrd.or(self.sizing.initrd.as_deref()),
        )
    }
}

/// Splits the spec's mounts: bind mounts of host paths go into the share (`binds`) and
/// reach the agent as share paths; the rest pass through.
fn mounts(bundle: &Bundle) -> Result<(Vec<Mount>, Vec<ShareBind>), TranslateError> {
    let mut binds = Vec::new();
    let mut mounts = Vec::new();
    for m in bundle.spec.mounts().clone().unwrap_or_default() {
        let destination = m.destination().to_string_lossy().into_owned();
        let kind = m.typ().clone().unwrap_or_default();
        let options = m.options().clone().unwrap_or_default();
        let source = m
            .source()
            .clone()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !is_bind(&kind, &options) {
            mounts.push(Mount {
                destination,
                kind,
                source,
                options,
                share_source: false,
            });
            continue;
        }
        let mut host = PathBuf::from(&source);
        if host.as_os_str().is_empty() {
            return Err(TranslateError::Mount {
                destination,
                reason: "bind mount without a source".into(),
            });
        }
        if host.is_relative() {
            host = bundle.dir.join(host);
        }
        if !host.exists() {
            return Err(TranslateError::Mount {
                destination,
                reason: format!("source {} does not exist", host.display()),
            });
        }
        let bind = ShareBind {
            index: binds.len(),
            source: host,
            readonly: options.iter().any(|o| o == "ro"),
        };
        mounts.push(Mount {
            destination,
            kind: "bind".into(),
            source: bind.share_path(),
            options,
            share_source: true,
        });
        binds.push(bind);
    }
    Ok((mounts, binds))
}

fn devices(linux: &oci_spec::runtime::Linux) -> Vec<Device> {
    linux
        .devices()
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|d| Device {
            path: d.path().to_string_lossy().into_owned(),
            kind: match d.typ() {
                LinuxDeviceType::B => "b",
                LinuxDeviceType::C => "c",
                LinuxDeviceType::U => "u",
                LinuxDeviceType::P => "p",
                LinuxDeviceType::A => "a",
            }
            .into(),
            major: d.major(),
            minor: d.minor(),
            file_mode: d.file_mode(),
            uid: d.uid(),
            gid: d.gid(),
        })
        .collect()
}

/// Translates `bundle` for container `id`.
pub fn plan(bundle: &Bundle, id: &str, no_pivot: bool) -> Result<Plan, TranslateError> {
    let spec = &bundle.spec;
    let (mounts, binds) = mounts(bundle)?;
    let linux = spec.linux().clone().unwrap_or_default();
    let root_readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let sizing = sizing(bundle)?;
    let resources = resources(&linux, &sizing)?;
    Ok(Plan {
        sizing,
        process: process(bundle)?,
        container: ContainerSpec {
            share: Share::Virtiofs {
                tag: SHARE_TAG.into(),
            },
            rootfs: SHARE_ROOTFS.into(),
            readonly: root_readonly,
            hostname: spec.hostname().clone(),
            mounts,
            masked_paths: linux.masked_paths().clone().unwrap_or_default(),
            readonly_paths: linux.readonly_paths().clone().unwrap_or_default(),
            devices: devices(&linux),
            no_pivot,
            sysctl: isolation::sysctl(&linux)?,
            user_namespace: isolation::user_namespace(&linux)?,
            rootfs_propagation: isolation::rootfs_propagation(&linux)?,
            seccomp: isolation::seccomp(&bundle.raw)?,
        },
        rootfs: bundle.rootfs.clone(),
        binds,
        cgroups_path: linux
            .cgroups_path()
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| crate::cgroup::default_path(id)),
        resources,
        memory_limit: linux
            .resources()
            .as_ref()
            .and_then(|r| r.memory().as_ref().and_then(|m| m.limit())),
        namespaces: isolation::vmm_namespaces(&linux),
        template: template_allowed(bundle)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: serde_json::Value) -> (PathBuf, Bundle) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "runvm-tr-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::write(dir.join("hostfile"), "x").unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let b = Bundle::load(&dir).unwrap();
        (dir, b)
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "h",
            "process": {
                "args": ["sh"], "cwd": "/w", "env": ["A=1"], "terminal": true,
                "user": {"uid": 1000, "gid": 100, "additionalGids": [5]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
                "noNewPrivileges": true
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": "hostfile", "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "source": "/etc/hosts", "options": ["bind"]}
            ],
            "linux": {
                "resources": {"memory": {"limit": 268435456}, "cpu": {"quota": 150000, "period": 100000}},
                "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
                "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
                "cgroupsPath": "/runvm/x"
            }
        })
    }

    #[test]
    fn binds_move_into_the_share_and_the_rest_passes_through() {
        let (dir, b) = bundle(base());
        let p = plan(&b, "c", false).unwrap();
        assert_eq!(p.binds.len(), 2);
        assert_eq!(p.binds[0].source, b.dir.join("hostfile"));
        assert!(p.binds[0].readonly);
        assert!(!p.binds[1].readonly);
        let m = &p.container.mounts;
        assert_eq!((m[0].kind.as_str(), m[0].share_source), ("proc", false));
        assert_eq!(
            (m[1].source.as_str(), m[1].share_source),
            ("mounts/0", true)
        );
        assert_eq!(
            (m[2].kind.as_str(), m[2].source.as_str()),
            ("bind", "mounts/1")
        );
        assert_eq!(p.container.hostname.as_deref(), Some("h"));
        assert!(p.container.readonly);
        assert_eq!(p.container.devices[0].kind, "c");
        assert_eq!(p.container.masked_paths, ["/proc/kcore"]);
        assert_eq!(p.cgroups_path, "/runvm/x");
        assert_eq!(p.namespaces.network, None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn process_and_sizing_follow_the_spec() {
        let (dir, b) = bundle(base());
        let p = plan(&b, "c", false).unwrap();
        assert_eq!(p.process.args, ["sh"]);
        assert_eq!(p.process.cwd, "/w");
        assert_eq!(p.process.user.uid, 1000);
        assert_eq!(p.process.user.additional_gids, [5]);
        assert!(p.process.terminal && p.process.no_new_privileges);
        assert_eq!(p.process.rlimits[0].kind, "RLIMIT_NOFILE");
        assert_eq!(p.sizing.mem_mib, 256);
        assert_eq!(p.sizing.vcpus, 2, "quota 1.5 CPUs rounds up");
        std::fs::remove_dir_all(dir).unwrap();

        let mut cfg = base();
        cfg["linux"]["resources"] = serde_json::json!({"cpu": {"cpus": "0-3,6"}});
        let (dir, b) = bundle(cfg);
        let p = plan(&b, "c", false).unwrap();
        assert_eq!(
            (p.sizing.vcpus, p.sizing.mem_mib),
            (5, vmm::config::DEFAULT_MEM_MIB)
        );
        std::fs::remove_dir_all(dir).unwrap();

        let mut cfg = base();
        cfg["linux"]["resources"] = serde_json::json!({"memory": {"limit": 6291456}});
        let (dir, b) = bundle(cfg);
        assert!(matches!(
            plan(&b, "c", false),
            Err(TranslateError::MemoryTooSmall { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();

        let mut cfg = base();
        cfg["vm"] = serde_json::json!({"kernel": {"path": "/k", "parameters": ["a=1", "b"], "initrd": "/i"}, "hwConfig": {"vcpus": 3, "memory": 512}});
        let (dir, b) = bundle(cfg);
        let p = plan(&b, "c", false).unwrap();
        assert_eq!(p.sizing.kernel.as_deref(), Some(std::path::Path::new("/k")));
        assert_eq!(p.sizing.kernel_params, "a=1 b");
        assert_eq!((p.sizing.vcpus, p.sizing.mem_mib), (3, 512));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_bind_sources_are_refused() {
        let mut cfg = base();
        cfg["mounts"] = serde_json::json!([{"destination": "/x", "type": "bind", "source": "/no/such/path", "options": ["rbind"]}]);
        let (dir, b) = bundle(cfg);
        let e = plan(&b, "c", false).unwrap_err().to_string();
        assert!(e.contains("/no/such/path"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn network_namespace_follows_the_spec() {
        let mut cfg = base();
        cfg["linux"]["namespaces"] = serde_json::json!([{"type": "network"}, {"type": "pid"}]);
        let (dir, b) = bundle(cfg.clone());
        assert_eq!(
            plan(&b, "c", false).unwrap().namespaces.network,
            Some(VmmNamespace::New)
        );
        std::fs::remove_dir_all(dir).unwrap();
        cfg["linux"]["namespaces"][0]["path"] = "/proc/1/ns/net".into();
        let (dir, b) = bundle(cfg);
        assert_eq!(
            plan(&b, "c", false).unwrap().namespaces.network,
            Some(VmmNamespace::Join("/proc/1/ns/net".into()))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn cpusets_count() {
        assert_eq!(parse_cpuset_count("0"), Some(1));
        assert_eq!(parse_cpuset_count("0-3,8,10-11"), Some(7));
        assert_eq!(parse_cpuset_count("3-1"), None);
        assert_eq!(parse_cpuset_count(""), None);
    }
}
