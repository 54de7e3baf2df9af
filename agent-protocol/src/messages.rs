//! The messages: connection hellos, control requests and responses, and the process
//! description (a subset of the OCI `process` object, with its JSON field names).

use serde::{Deserialize, Serialize};

/// First frame of every connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Hello {
    /// A control connection: requests follow.
    Control { version: u32 },
    /// A stdio stream of process `process`: raw bytes follow.
    Stream {
        version: u32,
        process: String,
        stream: StreamKind,
    },
    /// Agent -> host on [`crate::READY_PORT`]: the agent is up.
    Ready { version: u32, agent: String },
}

/// Which stream a stdio connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// Host -> process stdin; end of stream closes stdin.
    Stdin,
    /// Process stdout -> host.
    Stdout,
    /// Process stderr -> host.
    Stderr,
    /// Both directions of the process's terminal.
    Terminal,
}

/// The user a process runs as.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umask: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub additional_gids: Vec<u32>,
}

/// Terminal size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleSize {
    pub height: u16,
    pub width: u16,
}

/// A resource limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub soft: u64,
    pub hard: u64,
}

/// What to run: the OCI `process` fields the agent implements.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSpec {
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default = "root_dir")]
    pub cwd: String,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub terminal: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_size: Option<ConsoleSize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<Rlimit>,
    #[serde(default)]
    pub no_new_privileges: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
    /// The capability sets; `None` leaves the process with the caller's (an exec'd process
    /// gets its container's init's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<crate::Capabilities>,
}

fn root_dir() -> String {
    "/".to_string()
}

/// Where the container's share (rootfs and bind-mount sources) comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Share {
    /// A virtio-fs device with this tag (an agent in a VM).
    Virtiofs { tag: String },
    /// A directory the agent can open directly (an agent on the host).
    Directory { path: String },
}

/// One mount of the container, in OCI terms. For bind mounts of host paths, `source` is a
/// path inside the share (`share_source`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub destination: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub options: Vec<String>,
    /// `source` is relative to the share, not a guest path.
    #[serde(default)]
    pub share_source: bool,
}

/// A device node to create in the container (OCI `linux.devices`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub path: String,
    /// `c`, `b`, `u` or `p`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub major: i64,
    #[serde(default)]
    pub minor: i64,
    #[serde(default)]
    pub file_mode: Option<u32>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

/// The container's file system and isolation: what the agent sets up before its init
/// process runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    pub share: Share,
    /// The rootfs, relative to the share.
    pub rootfs: String,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub masked_paths: Vec<String>,
    #[serde(default)]
    pub readonly_paths: Vec<String>,
    #[serde(default)]
    pub devices: Vec<Device>,
    /// chroot instead of pivot_root (`runc --no-pivot`).
    #[serde(default)]
    pub no_pivot: bool,
    /// `linux.sysctl`, applied in the guest (the whole guest kernel is the container's).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sysctl: std::collections::BTreeMap<String, String>,
    /// The processes run in a user namespace with these mappings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_namespace: Option<UserNamespace>,
    /// `linux.rootfsPropagation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_propagation: Option<String>,
    /// `linux.seccomp`, for every process of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<crate::Seccomp>,
}

/// A user namespace and its id maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserNamespace {
    #[serde(default)]
    pub uid_mappings: Vec<crate::IdMapping>,
    #[serde(default)]
    pub gid_mappings: Vec<crate::IdMapping>,
}

/// Which stdio streams the host attaches to a process that has no terminal. A stream the
/// host does not attach is connected to /dev/null.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stdio {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// Host -> agent requests on a control connection; each gets one [`Response`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Registers process `id`; it starts on [`Request::Start`], once its streams are
    /// attached. `init` marks the container's main process: when it exits, the agent
    /// ends the VM after reporting its status. With `container`, the init process gets
    /// that file system and its own namespaces, prepared now and blocked before exec;
    /// every later process joins them.
    Create {
        id: String,
        process: Box<ProcessSpec>,
        #[serde(default)]
        stdio: Stdio,
        #[serde(default)]
        init: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container: Option<Box<ContainerSpec>>,
    },
    /// Starts process `id`. Answered with [`Response::Started`].
    Start { id: String },
    /// Sends `signal` to process `id` (or to every process of its group with `all`).
    Signal { id: String, signal: i32, all: bool },
    /// Sets the terminal size of process `id`.
    Resize { id: String, rows: u16, cols: u16 },
    /// Closes the stdin of process `id`.
    CloseStdin { id: String },
    /// Waits for process `id` to exit and its output to be flushed. Answered with
    /// [`Response::Exited`].
    Wait { id: String },
    /// Lists the guest pids of the processes the agent started and that still run.
    Pids,
    /// Configures the VM's network interface as the container's (answered once the
    /// link is up, or after a short wait for it).
    Network { config: NetworkConfig },
    /// Gives the VM its own identity before anything of a container runs there (a VM
    /// restored from a template shares all of its state with its siblings until then):
    /// `entropy`, fresh host randomness, is mixed into the guest kernel's random pool,
    /// which is then reseeded; the wall clock is set to `realtime_ns` (nanoseconds since
    /// the epoch); the VM's hostname becomes `hostname`.
    Identity {
        entropy: Vec<u8>,
        realtime_ns: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
    },
    /// Ends the VM (after syncing file systems).
    Shutdown,
}

/// An IP address with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPrefix {
    pub address: std::net::IpAddr,
    pub prefix_len: u8,
}

/// A route through an interface: to `destination` (the default route without one),
/// through `gateway` (directly on the link without one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<IpPrefix>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::IpAddr>,
    /// Its priority (`metric`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

/// One interface of the container's network namespace, as the guest takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceConfig {
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    #[serde(default)]
    pub addresses: Vec<IpPrefix>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// The container's network as its VM takes it over.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    #[serde(default)]
    pub interfaces: Vec<InterfaceConfig>,
}

/// Agent -> host answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Hello::Control`].
    Welcome {
        version: u32,
        agent: String,
    },
    Ok,
    Started {
        pid: i32,
    },
    /// Exit status: the exit code, or 128 + the signal that killed it.
    Exited {
        status: i32,
    },
    Pids {
        pids: Vec<i32>,
    },
    /// The process cannot run: `status` is what a shell would report (127: not found,
    /// 126: not executable, 1: other setup failures).
    ExecFailed {
        status: i32,
        message: String,
    },
    Error {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_spec_reads_oci_process_json() {
        let oci = r#"{
            "terminal": true,
            "user": {"uid": 1000, "gid": 100, "additionalGids": [5, 6], "umask": 18},
            "args": ["sh", "-c", "echo hi"],
            "env": ["PATH=/bin"],
            "cwd": "/tmp",
            "consoleSize": {"height": 24, "width": 80},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
            "oomScoreAdj": 100,
            "capabilities": {"bounding": ["CAP_KILL"]}
        }"#;
        let p: ProcessSpec = serde_json::from_str(oci).unwrap();
        assert_eq!(p.args, ["sh", "-c", "echo hi"]);
        assert_eq!(p.user.additional_gids, [5, 6]);
        assert_eq!(p.user.umask, Some(18));
        assert_eq!(
            p.console_size,
            Some(ConsoleSize {
                height: 24,
                width: 80
            })
        );
        assert_eq!(p.rlimits[0].kind, "RLIMIT_NOFILE");
        assert!(p.terminal && p.no_new_privileges);
        let minimal: ProcessSpec = serde_json::from_str(r#"{"args": ["true"]}"#).unwrap();
        assert_eq!(minimal.cwd, "/");
        assert_eq!(minimal.user, User::default());
    }

    #[test]
    fn version_check() {
        assert!(crate::check_version(crate::PROTOCOL_VERSION).is_ok());
        let e = crate::check_version(99).unwrap_err();
        assert!(e.contains("99") && e.contains("speaks 1"), "{e}");
    }
}
