//! CNI for `ctr run --cni` without touching the host: a `bridge` network (`host-local`
//! IPAM, its state in the test's directory) plus `loopback`, from Debian's
//! containernetworking-plugins. gocni reads its configuration from /etc/cni/net.d and its
//! plugins from /opt/cni/bin, and libcni caches results in /var/lib/cni, with no flag or
//! environment variable to move them; so `mount_setup` overlays those three directories
//! inside a private mount namespace (`clients::Engine::containerd_in_netns`), with the
//! upper layers in the test's directory: the host's /etc, /opt and /var/lib never change.

use std::path::Path;
use std::process::Command;

/// Where Debian's containernetworking-plugins puts the plugins.
pub const PLUGINS: &str = "/usr/lib/cni";

/// Why a `ctr --cni` test cannot run here, or None.
pub fn cni_unavailable() -> Option<String> {
    for plugin in ["bridge", "host-local", "loopback"] {
        if !Path::new(PLUGINS).join(plugin).is_file() {
            return Some(format!(
                "the CNI plugin {PLUGINS}/{plugin} is missing (`make deps` installs \
                 containernetworking-plugins)"
            ));
        }
    }
    for tool in ["unshare", "nsenter"] {
        let found = Command::new(tool).arg("--version").output();
        if !found.is_ok_and(|o| o.status.success()) {
            return Some(format!("util-linux's {tool} is not installed"));
        }
    }
    None
}

/// A bridge network on `10.88.<n>.0/24`: the bridge (the gateway, `.1`) lives in the
/// namespace the CNI plugins run in.
#[derive(Debug, Clone)]
pub struct BridgeNet {
    pub name: String,
    pub bridge: String,
    n: u8,
}

impl BridgeNet {
    pub fn new(name: &str, bridge: &str, n: u8) -> Self {
        BridgeNet {
            name: name.into(),
            bridge: bridge.into(),
            n,
        }
    }

    /// The subnet's first three octets, `10.88.<n>.` (an address in it starts so).
    pub fn prefix(&self) -> String {
        format!("10.88.{}.", self.n)
    }

    /// The bridge's address: the containers' gateway.
    pub fn gateway(&self) -> String {
        format!("{}1", self.prefix())
    }

    /// The conflist: the bridge as gateway, no masquerading, a default route, and
    /// host-local's allocations under `ipam_dir`.
    pub fn conflist(&self, ipam_dir: &Path) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": ipam_dir,
                        "ranges": [[{"subnet": format!("{}0/24", self.prefix())}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "loopback"},
            ],
        })
    }

    /// Prepares `dir/cni` (the conflist, the overlays' layers, host-local's state) and
    /// returns the shell lines that mount it over gocni's and libcni's paths, to run in a
    /// private mount namespace.
    pub fn mount_setup(&self, dir: &Path) -> Result<String, String> {
        let io = |e: std::io::Error| e.to_string();
        let cni = dir.join("cni");
        let net_d = cni.join("etc/upper/cni/net.d");
        for d in [
            net_d.clone(),
            cni.join("etc/work"),
            cni.join("opt/upper/cni/bin"),
            cni.join("opt/work"),
            cni.join("var-lib/upper/cni"),
            cni.join("var-lib/work"),
            cni.join("ipam"),
        ] {
            std::fs::create_dir_all(d).map_err(io)?;
        }
        let conf = self.conflist(&cni.join("ipam"));
        let path = net_d.join(format!("10-{}.conflist", self.name));
        std::fs::write(path, conf.to_string()).map_err(io)?;
        let c = cni.display();
        let overlay = |target: &str, layers: &str| {
            format!(
                "mount -t overlay overlay -o lowerdir={target},upperdir={c}/{layers}/upper,\
                 workdir={c}/{layers}/work {target}\n"
            )
        };
        Ok([
            overlay("/etc", "etc"),
            overlay("/opt", "opt"),
            format!("mount --bind {PLUGINS} /opt/cni/bin\n"),
            overlay("/var/lib", "var-lib"),
        ]
        .concat())
    }
}
