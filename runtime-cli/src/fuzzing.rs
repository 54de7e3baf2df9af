//! Entry points for fuzzing (`fuzz/`, and the stable smoke test that runs them on kept
//! inputs): any config.json must be refused with an error or translated, never panic.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::bundle::Bundle;
use crate::translate;

/// One bundle directory per process, with an empty rootfs; each input is its config.json.
fn bundle_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("runvm-fuzz-bundle-{}", std::process::id()));
        std::fs::create_dir_all(d.join("rootfs")).expect("fuzz bundle directory");
        d
    })
}

/// Loads `data` as a bundle's config.json and translates it.
pub fn translate(data: &[u8]) {
    let dir = bundle_dir();
    std::fs::write(dir.join("config.json"), data).expect("writing config.json");
    if let Ok(bundle) = Bundle::load(dir) {
        let _ = translate::plan(&bundle, "fuzz", false);
    }
}

/// Removes this process's bundle directory (the smoke test calls it when done).
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(bundle_dir());
}
