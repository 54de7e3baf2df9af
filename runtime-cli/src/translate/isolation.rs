//! The parts of a spec that confine the container inside the guest (capabilities, the
//! seccomp profile, sysctls, a user namespace, the root's propagation) and the namespaces
//! the VMM process itself takes. Each is checked here, so a bad one fails `create` before
//! any VM exists; the guest agent applies them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use agent_protocol::{Capabilities, IdMapping, Seccomp, UserNamespace};
use oci_spec::runtime::{Linux, LinuxNamespaceType, Process};

use super::TranslateError;

fn invalid(message: String) -> TranslateError {
    TranslateError::Invalid(message)
}

/// `process.capabilities` as names (`CAP_...`), each set sorted. oci-spec has already
/// refused unknown names.
pub fn capabilities(p: &Process) -> Option<Capabilities> {
    let c = p.capabilities().as_ref()?;
    let names = |set: &Option<oci_spec::runtime::Capabilities>| -> Vec<String> {
        let mut v: Vec<String> = set
            .iter()
            .flatten()
            .filter_map(|c| serde_json::to_value(c).ok()?.as_str().map(String::from))
            .collect();
        v.sort();
        v
    };
    Some(Capabilities {
        bounding: names(c.bounding()),
        effective: names(c.effective()),
        inheritable: names(c.inheritable()),
        permitted: names(c.permitted()),
        ambient: names(c.ambient()),
    })
}

/// Actions the guest's seccomp (libseccomp) carries out.
const SECCOMP_ACTIONS: [&str; 8] = [
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
];
/// Argument comparisons.
const SECCOMP_OPS: [&str; 7] = [
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
];
/// Filter flags.
const SECCOMP_FLAGS: [&str; 3] = [
    "SECCOMP_FILTER_FLAG_TSYNC",
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
];

/// `linux.seccomp`, checked for what can be checked without the guest's seccomp library
/// (which checks system call and architecture names when the container is prepared).
pub fn seccomp(raw: &serde_json::Value) -> Result<Option<Seccomp>, TranslateError> {
    let v = &raw["linux"]["seccomp"];
    if v.is_null() {
        return Ok(None);
    }
    let s: Seccomp =
        serde_json::from_value(v.clone()).map_err(|e| invalid(format!("linux.seccomp: {e}")))?;
    let action = |a: &str| {
        if SECCOMP_ACTIONS.contains(&a) {
            Ok(())
        } else {
            Err(invalid(format!("linux.seccomp: unsupported action {a:?}")))
        }
    };
    action(&s.default_action)?;
    for f in &s.flags {
        if !SECCOMP_FLAGS.contains(&f.as_str()) {
            return Err(invalid(format!("linux.seccomp: unknown flag {f:?}")));
        }
    }
    for rule in &s.syscalls {
        action(&rule.action)?;
        if rule.names.is_empty() {
            return Err(invalid(
                "linux.seccomp: a rule without syscall names".into(),
            ));
        }
        for a in &rule.args {
            if !SECCOMP_OPS.contains(&a.op.as_str()) || a.index > 5 {
                return Err(invalid(format!(
                    "linux.seccomp: bad argument condition {} on {:?} (index {})",
                    a.op, rule.names, a.index
                )));
            }
        }
    }
    Ok(Some(s))
}

/// `linux.sysctl`: every key a dotted name of something under /proc/sys.
pub fn sysctl(linux: &Linux) -> Result<BTreeMap<String, String>, TranslateError> {
    let map: BTreeMap<String, String> = linux
        .sysctl()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    for key in map.keys() {
        let ok = !key.is_empty()
            && !key.contains('/')
            && key.split('.').all(|part| !part.is_empty() && part != "..");
        if !ok {
            return Err(invalid(format!("sysctl {key:?} is not a valid name")));
        }
    }
    Ok(map)
}

fn mappings(m: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>) -> Vec<IdMapping> {
    m.iter()
        .flatten()
        .map(|m| IdMapping {
            container_id: m.container_id(),
            host_id: m.host_id(),
            size: m.size(),
        })
        .collect()
}

fn check_mappings(what: &str, maps: &[IdMapping]) -> Result<(), TranslateError> {
    if maps.is_empty() {
        return Err(invalid(format!(
            "a user namespace needs {what} mappings (linux.{what}Mappings is empty)"
        )));
    }
    for m in maps {
        let fits = |start: u32| start.checked_add(m.size).is_some();
        if m.size == 0 || !fits(m.container_id) || !fits(m.host_id) {
            return Err(invalid(format!(
                "invalid {what} mapping {} -> {} (size {})",
                m.container_id, m.host_id, m.size
            )));
        }
    }
    Ok(())
}

/// A user namespace with its mappings, when the spec asks for one.
pub fn user_namespace(linux: &Linux) -> Result<Option<UserNamespace>, TranslateError> {
    let wanted = namespace(linux, LinuxNamespaceType::User).is_some();
    let ns = UserNamespace {
        uid_mappings: mappings(linux.uid_mappings()),
        gid_mappings: mappings(linux.gid_mappings()),
    };
    if !wanted {
        if !ns.uid_mappings.is_empty() || !ns.gid_mappings.is_empty() {
            return Err(invalid(
                "uid/gid mappings are set but linux.namespaces has no user namespace".into(),
            ));
        }
        return Ok(None);
    }
    if namespace(linux, LinuxNamespaceType::User).is_some_and(|p| p.is_some()) {
        return Err(invalid(
            "joining an existing user namespace is not supported: the container's user namespace lives in its VM".into(),
        ));
    }
    check_mappings("uid", &ns.uid_mappings)?;
    check_mappings("gid", &ns.gid_mappings)?;
    Ok(Some(ns))
}

/// Propagation names `linux.rootfsPropagation` may take.
const PROPAGATIONS: [&str; 8] = [
    "shared",
    "slave",
    "private",
    "unbindable",
    "rshared",
    "rslave",
    "rprivate",
    "runbindable",
];

/// `linux.rootfsPropagation`, checked.
pub fn rootfs_propagation(linux: &Linux) -> Result<Option<String>, TranslateError> {
    match linux.rootfs_propagation() {
        None => Ok(None),
        Some(p) if PROPAGATIONS.contains(&p.as_str()) => Ok(Some(p.clone())),
        Some(p) => Err(invalid(format!(
            "rootfsPropagation {p:?} is not a propagation type"
        ))),
    }
}

/// The entry of `kind` in `linux.namespaces`: `None` if absent, `Some(path)` if present
/// (`Some(None)`: a new namespace).
fn namespace(linux: &Linux, kind: LinuxNamespaceType) -> Option<Option<PathBuf>> {
    let n = linux
        .namespaces()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|n| n.typ() == kind)?;
    Some(n.path().clone().filter(|p| !p.as_os_str().is_empty()))
}

/// A namespace the VMM process lives in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmNamespace {
    /// A new one.
    New,
    /// The one at this path.
    Join(PathBuf),
}

/// The namespaces the VMM process takes from the spec: the ones that change nothing for
/// it (UTS, IPC, cgroup) and the network namespace where hooks find the container's
/// network. Host tools that inspect the container through `/proc/<pid>/ns/*` of the pid
/// runvm reports then see these. Mount (the VMM has a private one of its own), PID and
/// user namespaces apply inside the guest only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmmNamespaces {
    pub uts: Option<VmmNamespace>,
    pub ipc: Option<VmmNamespace>,
    pub cgroup: Option<VmmNamespace>,
    pub network: Option<VmmNamespace>,
}

/// The [`VmmNamespaces`] of a spec.
pub fn vmm_namespaces(linux: &Linux) -> VmmNamespaces {
    let get = |kind| {
        namespace(linux, kind).map(|p| match p {
            Some(path) => VmmNamespace::Join(path),
            None => VmmNamespace::New,
        })
    };
    VmmNamespaces {
        uts: get(LinuxNamespaceType::Uts),
        ipc: get(LinuxNamespaceType::Ipc),
        cgroup: get(LinuxNamespaceType::Cgroup),
        network: get(LinuxNamespaceType::Network),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(v: serde_json::Value) -> Linux {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn user_namespaces_need_valid_mappings() {
        let ok = linux(serde_json::json!({
            "namespaces": [{"type": "user"}],
            "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 10}],
            "gidMappings": [{"containerID": 0, "hostID": 1000, "size": 10}]
        }));
        let ns = user_namespace(&ok).unwrap().unwrap();
        assert_eq!(ns.uid_mappings[0].host_id, 1000);
        let none = linux(serde_json::json!({"namespaces": [{"type": "user"}]}));
        assert!(user_namespace(&none)
            .unwrap_err()
            .to_string()
            .contains("uid mappings"));
        let zero = linux(serde_json::json!({
            "namespaces": [{"type": "user"}],
            "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 0}],
            "gidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]
        }));
        assert!(user_namespace(&zero)
            .unwrap_err()
            .to_string()
            .contains("invalid uid mapping"));
        let orphan = linux(serde_json::json!({
            "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]
        }));
        assert!(user_namespace(&orphan).is_err());
        assert_eq!(user_namespace(&linux(serde_json::json!({}))).unwrap(), None);
    }

    #[test]
    fn seccomp_profiles_are_checked() {
        let raw = |s: serde_json::Value| serde_json::json!({"linux": {"seccomp": s}});
        let good = raw(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]}]
        }));
        assert_eq!(seccomp(&good).unwrap().unwrap().syscalls[0].names, ["read"]);
        for (bad, needle) in [
            (
                serde_json::json!({"defaultAction": "SCMP_ACT_NOPE"}),
                "unsupported action",
            ),
            (
                serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["X"]}),
                "unknown flag",
            ),
            (
                serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 9, "value": 0, "op": "SCMP_CMP_EQ"}]}]}),
                "bad argument",
            ),
        ] {
            let e = seccomp(&raw(bad)).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        assert_eq!(seccomp(&serde_json::json!({})).unwrap(), None);
    }

    #[test]
    fn sysctl_names_and_propagation_are_checked() {
        let l = linux(serde_json::json!({"sysctl": {"net.ipv4.ip_forward": "1"}}));
        assert_eq!(sysctl(&l).unwrap()["net.ipv4.ip_forward"], "1");
        let l = linux(serde_json::json!({"sysctl": {"../etc/passwd": "x"}}));
        assert!(sysctl(&l).is_err());
        let l = linux(serde_json::json!({"rootfsPropagation": "rslave"}));
        assert_eq!(rootfs_propagation(&l).unwrap().as_deref(), Some("rslave"));
        let l = linux(serde_json::json!({"rootfsPropagation": "sideways"}));
        assert!(rootfs_propagation(&l).is_err());
    }

    #[test]
    fn the_vmm_takes_harmless_namespaces() {
        let l = linux(serde_json::json!({"namespaces": [
            {"type": "uts"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "pid"}, {"type": "mount"}
        ]}));
        let ns = vmm_namespaces(&l);
        assert_eq!(ns.uts, Some(VmmNamespace::New));
        assert_eq!(ns.ipc, Some(VmmNamespace::Join("/proc/1/ns/ipc".into())));
        assert_eq!((ns.cgroup, ns.network), (None, None));
    }
}
