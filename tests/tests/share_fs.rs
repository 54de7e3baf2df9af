//! The container share in a real VM: POSIX behaviour of a host directory bind-mounted
//! into the container over virtio-fs (`fs-check` runs inside), what the host sees
//! afterwards, and containment: nothing outside the share is reachable from the guest.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use runvm_tests::{
    container_test_unavailable, runvm, skip_unless, static_test_bin, token, TempDir, TestBundle,
};

#[test]
fn posix_behaviour_and_containment_through_the_share() {
    skip_unless!(container_test_unavailable().or_else(|| static_test_bin("fs-check").err()));
    let root = TempDir::new("root");
    let host = TempDir::new("host");
    let work = host.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(host.path().join("secret-dir")).unwrap();
    let secret = token();
    std::fs::write(host.path().join("secret-dir/secret"), &secret).unwrap();
    let work_s = work.to_string_lossy().into_owned();
    let mut b = TestBundle::new("fs", &["fs-check", "/work", &work_s]);
    std::fs::copy(
        static_test_bin("fs-check").unwrap(),
        b.rootfs().join("bin/fs-check"),
    )
    .unwrap();
    b.edit(|c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!(
            {"destination": "/work", "type": "bind", "source": work_s.clone(), "options": ["rbind", "rw"]}
        ));
        c["process"]["env"].as_array_mut().unwrap().push(format!("SECRET={secret}").into());
    });
    let f = runvm(
        root.path(),
        &["run", "--bundle", &b.path().to_string_lossy(), "fs1"],
        Duration::from_secs(1800),
    );
    let failed: Vec<&str> = f.stdout.lines().filter(|l| !l.starts_with("ok ")).collect();
    assert!(
        failed.is_empty() && f.code == Some(0),
        "fs-check in the VM:\n{}\n{}",
        f.stdout,
        f.stderr
    );
    assert_eq!(f.stdout.lines().count(), 13, "{}", f.stdout);
    // What the guest did is what the host has.
    let owned = std::fs::metadata(work.join("ownership/owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 1001));
    assert_eq!(
        std::fs::read_dir(work.join("dir-10000/many"))
            .unwrap()
            .count(),
        10_000
    );
    assert_eq!(
        std::fs::read_to_string(work.join("hard-links/hb")).unwrap(),
        "two"
    );
    assert_eq!(
        std::fs::read_to_string(host.path().join("secret-dir/secret")).unwrap(),
        secret
    );
    // The guest could not add anything outside the bind mount.
    let top: Vec<_> = std::fs::read_dir(host.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(top.len(), 2, "{top:?}");
}
