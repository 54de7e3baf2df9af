//! Containers started from VM templates (runvm's default): two containers restored from
//! one template each get their own randomness, hostname and wall clock; a template that is
//! refused (corrupted) leaves the container to a cold boot with a log line; a store
//! without the container's template gets it made in the background, by one builder at a
//! time, and the next container restores it, unless its bundle says
//! `run.oci.runvm.template=false`. A template's VM runs in the VMM's jail, without root's
//! powers, under the supervisor's seccomp filter. Needs /dev/kvm, the kernel and the
//! agent initramfs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use runvm_tests::{
    container_test_unavailable, ok, proc_status, run_with_timeout, runvm, runvm_bin,
    shared_templates, skip_unless, Finished, SmallDisk, TempDir, TestBundle,
};

const T: Duration = Duration::from_secs(300);
const SCRIPT: &str =
    "hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s";

/// `runvm --template-dir STORE --log LOG ARGS` as a command.
fn runvm_with(store: &Path, log: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(runvm_bin().unwrap());
    c.arg("--template-dir")
        .arg(store)
        .arg("--log")
        .arg(log)
        .args(args);
    c
}

/// Makes the default shape's template in `store` if it has none; returns its key.
fn default_template(store: &Path) -> String {
    let dir = TempDir::new("tpl-make");
    let f = run_with_timeout(
        runvm_with(store, &dir.path().join("log"), &["template", "create"]),
        T,
    );
    ok(&f, "runvm template create");
    f.stdout.trim().to_string()
}

/// A foreground `runvm run` of a bundle printing its hostname, 32 random bytes and the
/// time, with hostname `name`; returns the run and its log.
fn identity_run(
    store: &Path,
    root: &Path,
    name: &str,
    edit: &[(&str, &str)],
) -> (Finished, String) {
    let mut b = TestBundle::new(name, &["sh", "-c", SCRIPT]);
    b.edit(|c| {
        c["hostname"] = name.into();
        for (k, v) in edit {
            c["annotations"][*k] = (*v).into();
        }
    });
    let log = root.join(format!("{name}.log"));
    let mut cmd = runvm_with(store, &log, &["--root", root.to_str().unwrap()]);
    cmd.args(["run", "--bundle"]).arg(b.path()).arg(name);
    let f = run_with_timeout(cmd, T);
    ok(&f, name);
    (f, std::fs::read_to_string(&log).unwrap_or_default())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The three lines of [`SCRIPT`]: hostname, random hex, seconds.
fn identity(f: &Finished) -> (String, String, i64) {
    let lines: Vec<&str> = f.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", f.stdout);
    assert_eq!(lines[1].len(), 64, "{}", f.stdout);
    (
        lines[0].to_string(),
        lines[1].to_string(),
        lines[2].trim().parse().expect("date +%s"),
    )
}

#[test]
fn containers_from_one_template_get_their_own_identity() {
    skip_unless!(container_test_unavailable());
    let store = shared_templates();
    let key = default_template(&store);
    let root = TempDir::new("tpl-identity");
    let runs: Vec<_> = ["tpl-one", "tpl-two"]
        .into_iter()
        .map(|name| {
            let (store, root) = (store.clone(), root.path().to_path_buf());
            std::thread::spawn(move || identity_run(&store, &root, name, &[]))
        })
        .collect();
    let results: Vec<_> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    let mut randoms = Vec::new();
    for ((f, log), name) in results.iter().zip(["tpl-one", "tpl-two"]) {
        assert!(
            log.contains(&format!(
                "VM restored from template {}",
                store.join(&key).display()
            )),
            "{name} did not start from the template:\n{log}"
        );
        let (host, random, secs) = identity(f);
        assert_eq!(host, name);
        assert!((secs - now()).abs() < 120, "{name}'s clock says {secs}");
        randoms.push(random);
    }
    assert_ne!(
        randoms[0], randoms[1],
        "both VMs read the same random bytes"
    );
}

#[test]
fn a_refused_template_leaves_the_container_to_a_cold_boot() {
    skip_unless!(container_test_unavailable());
    let key = default_template(&shared_templates());
    let store = TempDir::new("tpl-corrupt");
    // A store must be private to be used at all.
    std::fs::set_permissions(
        store.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let copy = store.path().join(&key);
    let st = Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(shared_templates().join(&key))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    let state = copy.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x01;
    std::fs::write(&state, bytes).unwrap();
    let root = TempDir::new("tpl-corrupt-root");
    let (f, log) = identity_run(store.path(), root.path(), "tpl-cold", &[]);
    assert_eq!(identity(&f).0, "tpl-cold");
    assert!(
        log.contains("template refused")
            && log.contains("checksum")
            && log.contains("booting instead"),
        "{log}"
    );
    assert!(!log.contains("VM restored"), "{log}");
    // The refused template was moved aside and a builder made it again.
    wait_for_builders(store.path());
    let list = runvm(
        root.path(),
        &[
            "--template-dir",
            store.path().to_str().unwrap(),
            "template",
            "list",
        ],
        T,
    );
    let rows: Vec<&str> = list.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{}", list.stdout);
    assert!(
        rows[0].starts_with(&key) && rows[0].ends_with(" -"),
        "{}",
        list.stdout
    );
}

/// Waits until no builder works on `store`.
fn wait_for_builders(store: &Path) {
    let deadline = Instant::now() + T;
    while !builders(store).is_empty() {
        assert!(Instant::now() < deadline, "the builder did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A container restored from the template in `store` keeps working (and touching guest
/// memory) after the template is removed under it.
fn in_use_template_removed(store: &Path, root: &Path) {
    let b = TestBundle::new(
        "tpl-removed",
        &[
            "sh",
            "-c",
            "sleep 5; dd if=/dev/zero bs=1M count=16 2>/dev/null | wc -c; echo DONE",
        ],
    );
    let log = root.join("tpl-removed.log");
    let mut cmd = runvm_with(store, &log, &["--root", root.to_str().unwrap()]);
    cmd.args(["run", "--bundle"])
        .arg(b.path())
        .arg("tpl-removed");
    let run = std::thread::spawn(move || run_with_timeout(cmd, T));
    let deadline = Instant::now() + T;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("VM restored")
    {
        assert!(Instant::now() < deadline, "the container did not restore");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rm = runvm(
        root,
        &[
            "--template-dir",
            store.to_str().unwrap(),
            "template",
            "rm",
            "--all",
        ],
        T,
    );
    ok(&rm, "template rm --all");
    let f = run.join().unwrap();
    ok(&f, "a container whose template was removed");
    assert_eq!(
        f.stdout.split_whitespace().collect::<Vec<_>>(),
        ["16777216", "DONE"]
    );
    let list = runvm(
        root,
        &[
            "--template-dir",
            store.to_str().unwrap(),
            "template",
            "list",
        ],
        T,
    );
    assert_eq!(list.stdout.lines().count(), 1, "{}", list.stdout);
}

/// A store on a file system without room for the guest's memory: the build is refused
/// before any VM boots (a full disk while a snapshot is written is `snapshot.rs`'s).
#[test]
fn a_template_that_does_not_fit_on_disk_fails_in_one_line_and_leaves_nothing() {
    skip_unless!(container_test_unavailable());
    let disk = SmallDisk::new(8);
    let store = disk.path().join("templates");
    let logs = TempDir::new("tpl-full-log");
    let f = run_with_timeout(
        runvm_with(&store, &logs.path().join("log"), &["template", "create"]),
        T,
    );
    runvm_tests::fails_with(&f, "8 MiB free, a template of 128 MiB");
    let left: Vec<String> = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut left = left;
    left.sort();
    assert!(
        left.len() == 2 && left[0].starts_with(".failed-") && left[1] == ".lock",
        "a failed build leaves only the lock file and the record of its failure: {left:?}"
    );
}

/// Pids of `runvm ... template create` processes working on `store`, with the children
/// that run their VMs (same command line).
fn build_processes(store: &Path) -> Vec<i32> {
    let needle = store.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmd
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let building = args
                .windows(2)
                .any(|w| w[0] == "template" && w[1] == "create");
            (building && args.iter().any(|a| a == &needle)).then_some(pid)
        })
        .collect()
}

/// The builders working on `store` (not the children running their VMs).
fn builders(store: &Path) -> Vec<i32> {
    let all = build_processes(store);
    let parent = |pid: i32| proc_status(pid, "PPid").and_then(|p| p.parse::<i32>().ok());
    all.iter()
        .copied()
        .filter(|&pid| parent(pid).is_some_and(|pp| !all.contains(&pp)))
        .collect()
}

/// The child of a builder on `store` that runs the template's VM, once its VM's threads
/// run (they start only after the child confined itself).
fn template_vm_process(store: &Path, deadline: Instant) -> Option<i32> {
    while Instant::now() < deadline {
        let all = build_processes(store);
        let tops = builders(store);
        let vm = all.into_iter().find(|p| !tops.contains(p)).filter(|&p| {
            proc_status(p, "Threads").is_some_and(|t| t.parse::<u32>().unwrap_or(0) > 1)
        });
        if vm.is_some() {
            return vm;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// What the test sees of a template's VM process.
struct Confinement {
    seccomp: Option<String>,
    no_new_privs: Option<String>,
    caps: u64,
    ns_pid: Option<String>,
    host_etc: bool,
    runvm_bin: bool,
    kernel: bool,
    store_entries: Option<usize>,
    fds: Vec<PathBuf>,
}

#[test]
fn a_template_vm_runs_in_the_vmm_jail_without_root_powers_under_the_filter() {
    skip_unless!(container_test_unavailable());
    let dir = TempDir::new("tpl-confined");
    let store = std::fs::canonicalize(dir.path()).unwrap().join("templates");
    let log = dir.path().join("log");
    let build = {
        let (s, l) = (store.clone(), log.clone());
        std::thread::spawn(move || run_with_timeout(runvm_with(&s, &l, &["template", "create"]), T))
    };
    let vm = template_vm_process(&store, Instant::now() + T);
    let seen = vm.map(|pid| {
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let inside =
            |p: PathBuf| root.join(std::fs::canonicalize(p).unwrap().strip_prefix("/").unwrap());
        let cap_eff = proc_status(pid, "CapEff").unwrap_or_default();
        let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .collect();
        Confinement {
            seccomp: proc_status(pid, "Seccomp"),
            no_new_privs: proc_status(pid, "NoNewPrivs"),
            caps: u64::from_str_radix(&cap_eff, 16).unwrap_or(u64::MAX),
            ns_pid: proc_status(pid, "NSpid"),
            host_etc: root.join("etc").exists(),
            runvm_bin: inside(runvm_bin().unwrap()).exists(),
            kernel: inside(runvm_tests::kernel().unwrap()).exists(),
            store_entries: inside(store.clone()).read_dir().map(|d| d.count()).ok(),
            fds,
        }
    });
    let f = build.join().unwrap();
    ok(&f, "runvm template create");
    let c = seen.expect("the builder's VM child was never seen running");
    assert_eq!(c.seccomp.as_deref(), Some("2"), "a seccomp filter");
    assert_eq!(c.no_new_privs.as_deref(), Some("1"), "no_new_privs");
    for (cap, name) in [
        (21, "CAP_SYS_ADMIN"),
        (12, "CAP_NET_ADMIN"),
        (19, "CAP_SYS_PTRACE"),
    ] {
        assert_eq!(
            c.caps & (1 << cap),
            0,
            "{name} is dropped (CapEff {:x})",
            c.caps
        );
    }
    assert!(
        c.ns_pid
            .as_deref()
            .is_some_and(|n| n.ends_with(" 1") || n.ends_with("\t1")),
        "the first process of its own pid namespace: NSpid {:?}",
        c.ns_pid
    );
    assert!(
        !c.host_etc && !c.runvm_bin,
        "the host's files are out of its root"
    );
    assert!(c.kernel, "the kernel is in its root");
    // Only the build's own work directory of the store is in its root.
    assert_eq!(c.store_entries, Some(1), "the store's entries in its root");
    let work = store.join(".build-").to_string_lossy().into_owned();
    let store_fd = c
        .fds
        .iter()
        .find(|l| l.starts_with(&store) && !l.to_string_lossy().starts_with(&work));
    assert!(
        store_fd.is_none(),
        "no descriptor of the store's outside its work: {:?}",
        c.fds
    );
    let list = runvm_with(&store, &log, &["template", "list"]);
    let list = run_with_timeout(list, T);
    ok(&list, "template list");
    assert_eq!(list.stdout.lines().count(), 2, "{}", list.stdout);
}

#[test]
fn a_missing_template_is_made_in_the_background_by_one_builder() {
    skip_unless!(container_test_unavailable());
    let store = TempDir::new("tpl-background");
    let store_dir: PathBuf = store.path().join("templates");
    let root = TempDir::new("tpl-background-root");
    // Two containers at once find no template: one builder starts, never two.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (w, s) = (watching.clone(), store_dir.clone());
    let watcher = std::thread::spawn(move || {
        let mut most = 0;
        while w.load(std::sync::atomic::Ordering::SeqCst) {
            most = most.max(builders(&s).len());
            std::thread::sleep(Duration::from_millis(50));
        }
        most
    });
    let runs: Vec<_> = ["tpl-first", "tpl-second"]
        .into_iter()
        .map(|name| {
            let (s, r) = (store_dir.clone(), root.path().to_path_buf());
            std::thread::spawn(move || identity_run(&s, &r, name, &[]))
        })
        .collect();
    for r in runs {
        let (_, log) = r.join().unwrap();
        assert!(log.contains("no template of its VM's shape yet"), "{log}");
    }
    wait_for_builders(&store_dir);
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(watcher.join().unwrap(), 1, "one builder, exactly");
    let list = runvm(
        root.path(),
        &[
            "--template-dir",
            store_dir.to_str().unwrap(),
            "template",
            "list",
        ],
        T,
    );
    ok(&list, "template list");
    let build_log = std::fs::read_to_string(store_dir.join(".build.log")).unwrap_or_default();
    assert_eq!(
        list.stdout.lines().count(),
        2,
        "{}\nbuild log:\n{build_log}",
        list.stdout
    );

    in_use_template_removed(&store_dir, root.path());
    let off = [("run.oci.runvm.template", "false")];
    let (f, log) = identity_run(&store_dir, root.path(), "tpl-off", &off);
    assert_eq!(identity(&f).0, "tpl-off");
    assert!(
        !log.contains("template"),
        "the annotation turns templates off:\n{log}"
    );
}
