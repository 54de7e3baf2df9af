//! The store's rules without VMs: private directories and files only, refusals with a
//! reason, removal by key only, one build at a time.

use std::os::unix::fs::PermissionsExt;

use super::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("runvm-tpl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn shape() -> Shape {
    let exe = std::env::current_exe().unwrap();
    let config = vmm::VmConfig::new(exe);
    let profile = vmm::HostProfile::for_kind(vmm::HostKind::HardwareKvm);
    crate::sandbox::shape(&config, &profile, true).unwrap()
}

/// A template directory for `shape` with files that are not a snapshot.
fn fake_template(store: &TemplateStore, shape: &Shape) -> PathBuf {
    let path = store.path(&shape.key());
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .unwrap();
    for f in [snapshot::STATE_FILE, snapshot::MEMORY_FILE] {
        crate::state::write_private(&path.join(f), b"not a snapshot").unwrap();
    }
    path
}

#[test]
fn the_store_is_made_private_and_a_missing_template_is_none() {
    let dir = scratch("private");
    let store = TemplateStore::new(dir.join("templates"));
    store.ensure().unwrap();
    let mode = std::fs::metadata(store.dir()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(store.load(&shape()).unwrap().is_none());
    assert!(!store.has(&shape()));
    assert!(store.list().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn open_or_foreign_stores_and_files_are_refused() {
    let dir = scratch("refused");
    let store = TemplateStore::new(&dir);
    store.ensure().unwrap();
    let shape = shape();
    let path = fake_template(&store, &shape);
    let state = path.join(snapshot::STATE_FILE);
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = store.load(&shape).unwrap_err().to_string();
    assert!(e.contains("lets others in"), "{e}");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).unwrap();
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&state, Some(65534), None).unwrap();
        let e = store.load(&shape).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        std::os::unix::fs::chown(&state, Some(0), None).unwrap();
    }
    // Private, but not a snapshot: refused as such.
    let e = store.load(&shape).unwrap_err().to_string();
    assert!(e.contains("not a runvm state file"), "{e}");
    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, shape.key());
    assert!(listed[0].problem.is_some());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = store.ensure().unwrap_err().to_string();
    assert!(e.contains("mode 755"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn templates_are_removed_by_key_only() {
    let dir = scratch("remove");
    let store = TemplateStore::new(&dir);
    store.ensure().unwrap();
    let shape = shape();
    let path = fake_template(&store, &shape);
    for bad in ["", "..", ".lock", "../x", "missing"] {
        assert!(
            matches!(store.remove(bad), Err(TemplateError::NotFound(_))),
            "{bad}"
        );
    }
    store.remove(&shape.key()).unwrap();
    assert!(!path.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn only_the_refused_template_is_moved_aside_not_one_made_since() {
    use std::os::unix::fs::MetadataExt;
    let dir = scratch("refused-since");
    let store = TemplateStore::new(&dir);
    store.ensure().unwrap();
    let shape = shape();
    let key = shape.key();
    let old = std::fs::metadata(fake_template(&store, &shape)).unwrap();
    // A builder replaced the refused template with a new one since (the old one is
    // still held aside, so the new one cannot reuse its inode).
    std::fs::rename(store.path(&key), dir.join("held-aside")).unwrap();
    let new = std::fs::metadata(fake_template(&store, &shape)).unwrap();
    assert_ne!((old.dev(), old.ino()), (new.dev(), new.ino()));
    let outside = std::fs::metadata(&dir).unwrap();
    for bad in ["..", "../x", ".lock", ""] {
        assert!(
            store
                .quarantine_if(bad, outside.dev(), outside.ino())
                .is_err(),
            "{bad}"
        );
    }
    store.quarantine_if(&key, old.dev(), old.ino()).unwrap();
    assert!(store.has(&shape), "the new template stays");
    store.quarantine_if(&key, new.dev(), new.ino()).unwrap();
    assert!(!store.has(&shape), "the refused one goes");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_template_file_that_is_not_a_regular_file_is_refused() {
    let dir = scratch("fifo");
    let store = TemplateStore::new(&dir);
    store.ensure().unwrap();
    let shape = shape();
    let path = fake_template(&store, &shape);
    let state = path.join(snapshot::STATE_FILE);
    std::fs::remove_file(&state).unwrap();
    nix::unistd::mkfifo(&state, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    match store.load(&shape) {
        Err(TemplateError::Unsafe { reason, .. }) => {
            assert!(reason.contains("regular"), "{reason}")
        }
        other => panic!("a FIFO as state file: {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_build_at_a_time() {
    let dir = scratch("lock");
    let store = TemplateStore::new(&dir);
    store.ensure().unwrap();
    assert!(!store.building());
    let held = store.lock_builds().unwrap();
    assert!(store.building());
    drop(held);
    assert!(!store.building());
    let mode = std::fs::metadata(dir.join(LOCK_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the lock file is private too");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refused_templates_move_aside_failed_builds_back_off_and_old_ones_go() {
    let dir = scratch("aside");
    let store = TemplateStore::new(&dir);
    store.ensure().unwrap();
    let shape = shape();
    let key = shape.key();
    fake_template(&store, &shape);
    store.quarantine(&key).unwrap();
    assert!(!store.has(&shape));
    assert!(store.load(&shape).unwrap().is_none());
    store.quarantine(&key).unwrap();

    assert!(!store.failed_recently(&key));
    store.record_failure(&key, "no space");
    assert!(store.failed_recently(&key));
    store.clear_failure(&key);
    assert!(!store.failed_recently(&key));

    // Eviction keeps the most recently used.
    let now = std::time::SystemTime::now();
    for (i, k) in ["k0", "k1", "k2"].iter().enumerate() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(store.path(k))
            .unwrap();
        let d = File::open(store.path(k)).unwrap();
        d.set_modified(now - Duration::from_secs(100 * (3 - i as u64)))
            .unwrap();
    }
    store.touch("k0");
    store.evict(2);
    let left: Vec<String> = store.list().unwrap().into_iter().map(|t| t.key).collect();
    assert_eq!(left, ["k0", "k2"]);
    assert!(store.check_space(1).is_ok());
    assert!(matches!(
        store.check_space(u64::MAX >> 21),
        Err(TemplateError::NoSpace { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn only_the_stores_held_lock_is_taken_from_a_descriptor() {
    let dir = scratch("handed");
    let store = TemplateStore::new(&dir);
    store.ensure().unwrap();
    let held = store.try_lock_builds().unwrap().unwrap();
    assert!(store.is_build_lock(&held));
    let other = File::open(std::env::current_exe().unwrap()).unwrap();
    assert!(!store.is_build_lock(&other));
    // The lock file opened again, but not holding the lock: someone else holds it.
    let unheld = File::open(dir.join(LOCK_FILE)).unwrap();
    assert!(!store.is_build_lock(&unheld));
    drop(held);
    std::fs::remove_dir_all(&dir).unwrap();
}
