//! OCI bundles: `config.json` loaded and checked before anything is created: a supported
//! `ociVersion`, a rootfs directory, a process with arguments.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// Errors in a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {0} does not exist or is not a directory")]
    NoBundle(PathBuf),
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path} is not a valid OCI config: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: ociVersion {version:?} is not supported (runvm implements 1.x)")]
    Version { path: PathBuf, version: String },
    #[error("{path}: {what}")]
    Missing { path: PathBuf, what: String },
    #[error("rootfs {0} does not exist or is not a directory")]
    NoRootfs(PathBuf),
}

/// A loaded bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Absolute bundle directory.
    pub dir: PathBuf,
    pub spec: Spec,
    /// The raw JSON, for fields the typed spec does not carry (`vm.hwConfig`).
    pub raw: serde_json::Value,
    /// Absolute rootfs.
    pub rootfs: PathBuf,
}

impl Bundle {
    /// Loads `<dir>/config.json` and checks it.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let dir =
            std::fs::canonicalize(dir).map_err(|_| BundleError::NoBundle(dir.to_path_buf()))?;
        if !dir.is_dir() {
            return Err(BundleError::NoBundle(dir));
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| BundleError::Unreadable {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| BundleError::Malformed {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if !raw.is_object() {
            return Err(BundleError::Malformed {
                path,
                reason: "the top level must be a JSON object".into(),
            });
        }
        let spec: Spec =
            serde_json::from_value(raw.clone()).map_err(|e| BundleError::Malformed {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let version = spec.version().clone();
        if version.split('.').next() != Some("1") {
            return Err(BundleError::Version { path, version });
        }
        let root = spec.root().as_ref().ok_or_else(|| BundleError::Missing {
            path: path.clone(),
            what: "no root".into(),
        })?;
        let rootfs = if root.path().is_absolute() {
            root.path().clone()
        } else {
            dir.join(root.path())
        };
        if !rootfs.is_dir() {
            return Err(BundleError::NoRootfs(rootfs));
        }
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| BundleError::Missing {
                path: path.clone(),
                what: "no process".into(),
            })?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(BundleError::Missing {
                path,
                what: "process.args is empty".into(),
            });
        }
        Ok(Bundle {
            dir,
            spec,
            raw,
            rootfs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(config: &str) -> (PathBuf, Result<Bundle, BundleError>) {
        let dir = std::env::temp_dir().join(format!(
            "runvm-bundle-{}-{}",
            std::process::id(),
            config.len()
        ));
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        let r = Bundle::load(&dir);
        (dir, r)
    }

    #[test]
    fn good_and_bad_configs() {
        let good = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}}"#;
        let (d, r) = bundle_with(good);
        let b = r.unwrap();
        assert_eq!(b.rootfs, std::fs::canonicalize(&d).unwrap().join("rootfs"));
        std::fs::remove_dir_all(d).unwrap();

        let cases = [
            ("{not json", "not a valid OCI config"),
            (
                r#"{"ociVersion":"1.0.2","root":{"path":5}}"#,
                "not a valid OCI config",
            ),
            (
                r#"{"ociVersion":"2.0.0","root":{"path":"rootfs"},"process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
                "not supported",
            ),
            (
                r#"{"ociVersion":"1.0.2","root":{"path":"nope"},"process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
                "rootfs",
            ),
            (
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#,
                "no process",
            ),
            (
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
                "args",
            ),
        ];
        for (cfg, needle) in cases {
            let (d, r) = bundle_with(cfg);
            let e = r.unwrap_err().to_string();
            assert!(e.contains(needle), "{cfg}: {e}");
            std::fs::remove_dir_all(d).unwrap();
        }
        assert!(matches!(
            Bundle::load(Path::new("/nonexistent/bundle")),
            Err(BundleError::NoBundle(_))
        ));
    }
}
