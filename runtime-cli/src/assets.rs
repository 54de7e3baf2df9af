//! Finding the guest kernel and initramfs: an explicit path, then the environment
//! (`RUNVM_KERNEL`, `RUNVM_INITRD`), then the install location next to the binary
//! (`<bindir>/../share/runvm/`).

use std::path::{Path, PathBuf};

/// File name of the kernel in the install directory.
pub const KERNEL_NAME: &str = "vmlinux";
/// File name of the agent initramfs in the install directory.
pub const INITRD_NAME: &str = "initramfs.cpio";

/// Errors locating an asset.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssetError {
    #[error("no guest {what} found: pass {flag}, set {env}, or build and install one with `make install` (looked for {looked})")]
    Missing {
        what: &'static str,
        flag: &'static str,
        env: &'static str,
        looked: String,
    },
}

/// `<dir of the running binary>/../share/runvm`.
pub fn share_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.join("share").join("runvm"))
}

fn find(
    explicit: Option<&Path>,
    env: &'static str,
    name: &str,
    what: &'static str,
    flag: &'static str,
    share: Option<PathBuf>,
) -> Result<PathBuf, AssetError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let candidate = share.map(|d| d.join(name));
    match candidate {
        Some(c) if c.exists() => Ok(c),
        c => Err(AssetError::Missing {
            what,
            flag,
            env,
            looked: c.map_or_else(
                || "an install directory".into(),
                |c| c.display().to_string(),
            ),
        }),
    }
}

/// The guest kernel to boot.
pub fn kernel(explicit: Option<&Path>) -> Result<PathBuf, AssetError> {
    find(
        explicit,
        "RUNVM_KERNEL",
        KERNEL_NAME,
        "kernel",
        "--kernel",
        share_dir(),
    )
}

/// The agent initramfs.
pub fn initrd(explicit: Option<&Path>) -> Result<PathBuf, AssetError> {
    find(
        explicit,
        "RUNVM_INITRD",
        INITRD_NAME,
        "initramfs",
        "--initrd",
        share_dir(),
    )
}

/// The kernel and initramfs a VM boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl Assets {
    /// Both assets, each from its explicit path when given, else looked up.
    pub fn resolve(kernel: Option<&Path>, initrd: Option<&Path>) -> Result<Self, AssetError> {
        Ok(Assets {
            kernel: self::kernel(kernel)?,
            initrd: self::initrd(initrd)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_wins_then_share_dir() {
        let p = find(
            Some(Path::new("/k")),
            "RUNVM_TEST_UNSET_VAR",
            "vmlinux",
            "kernel",
            "--kernel",
            None,
        )
        .unwrap();
        assert_eq!(p, PathBuf::from("/k"));
        let dir = std::env::temp_dir().join(format!("runvm-assets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = find(
            None,
            "RUNVM_TEST_UNSET_VAR",
            "vmlinux",
            "kernel",
            "--kernel",
            Some(dir.clone()),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("--kernel")
                && msg.contains("RUNVM_TEST_UNSET_VAR")
                && msg.contains("make install"),
            "{msg}"
        );
        std::fs::write(dir.join("vmlinux"), b"x").unwrap();
        let p = find(
            None,
            "RUNVM_TEST_UNSET_VAR",
            "vmlinux",
            "kernel",
            "--kernel",
            Some(dir.clone()),
        )
        .unwrap();
        assert_eq!(p, dir.join("vmlinux"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
