//! A Docker-style config in a real VM: Docker's default capabilities, no_new_privileges, a
//! seccomp profile whose denied system call fails with the profile's errno, a sysctl, a
//! device node with its exact mode, a read-only root with a tmpfs on a path the image
//! lacks, and a shared bind mount; checked from inside the container in one boot.

use std::time::Duration;

use runvm_tests::{container_test_unavailable, runvm, skip_unless, TempDir, TestBundle};

/// One VM boot and container setup on software KVM takes ~25 s.
const T: Duration = Duration::from_secs(300);

const DOCKER_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];
/// Their bits.
const DOCKER_CAP_MASK: &str = "00000000a80425fb";

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

#[test]
fn a_docker_style_config_is_applied_in_the_guest() {
    skip_unless!(container_test_unavailable());
    let root = TempDir::new("root");
    let host = TempDir::new("host");
    let script = "grep -E '^(CapBnd|CapEff|CapPrm|CapInh|NoNewPrivs|Seccomp):' /proc/self/status; \
                  mkdir /scratch/denied 2>&1; echo mkdir=$?; \
                  echo forward=$(cat /proc/sys/net/ipv4/ip_forward); \
                  echo node=$(stat -c '%a %g' /dev/fuse); \
                  touch /scratch/ok && echo scratch=ok; \
                  touch /rootfile 2>/dev/null || echo root=read-only; \
                  grep ' /shared ' /proc/self/mountinfo | grep -q shared: && echo shared=yes";
    let mut b = TestBundle::new("fid", &["sh", "-c", script]);
    let shared = host.path().to_string_lossy().into_owned();
    b.edit(|c| {
        let caps: Vec<serde_json::Value> = DOCKER_CAPS.iter().map(|s| (*s).into()).collect();
        c["process"]["capabilities"] = serde_json::json!({
            "bounding": caps, "effective": caps, "permitted": caps
        });
        c["process"]["noNewPrivileges"] = true.into();
        c["root"]["readonly"] = true.into();
        c["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_forward": "1"});
        c["linux"]["devices"] = serde_json::json!([
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 432, "uid": 0, "gid": 5}
        ]);
        c["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
        });
        let mounts = c["mounts"].as_array_mut().unwrap();
        mounts.push(serde_json::json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs"}));
        mounts.push(serde_json::json!({"destination": "/shared", "type": "bind", "source": shared, "options": ["rbind", "rshared"]}));
    });
    let f = runvm(
        root.path(),
        &["run", "--bundle", &b.path().to_string_lossy(), "fid1"],
        T,
    );
    assert_eq!(
        f.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        f.stdout,
        f.stderr
    );
    let out = &f.stdout;
    for key in ["CapBnd:", "CapEff:", "CapPrm:"] {
        assert_eq!(field(out, key), DOCKER_CAP_MASK, "{key}\n{out}");
    }
    assert_eq!(field(out, "CapInh:"), "0000000000000000");
    assert_eq!(field(out, "NoNewPrivs:"), "1");
    assert_eq!(field(out, "Seccomp:"), "2");
    assert!(
        out.contains("Function not implemented"),
        "the profile's errno: {out}"
    );
    assert_eq!(field(out, "mkdir="), "1");
    assert_eq!(field(out, "forward="), "1");
    assert_eq!(field(out, "node="), "660 5");
    assert_eq!(field(out, "scratch="), "ok");
    assert_eq!(field(out, "root="), "read-only");
    assert_eq!(field(out, "shared="), "yes");
    assert!(!b.rootfs().join("rootfile").exists());
}
