use super::*;

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};

/// Runs `call` in a forked child under `kind`'s enforced filter; returns the child's exit
/// status and what it wrote to stderr.
fn in_filtered_child(kind: ThreadKind, call: impl FnOnce() -> i64) -> (i32, String) {
    let bpf = compile(kind, SeccompMode::Enforce).unwrap().unwrap();
    init_reporter();
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    // SAFETY: the child only makes system calls (dup2, prctl, seccomp, the call under
    // test, write, exit): it neither allocates nor takes locks another thread could hold.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            // SAFETY: fd 2 of the child becomes the pipe; nothing else uses it here.
            unsafe { libc::dup2(w.as_raw_fd(), 2) };
            if install_compiled(kind, &bpf).is_err() {
                // SAFETY: ends the child.
                unsafe { libc::_exit(3) };
            }
            let rc = call();
            // SAFETY: ends the child with whether the call succeeded.
            unsafe { libc::_exit(if rc >= 0 { 0 } else { 4 }) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut out = String::new();
            std::fs::File::from(r).read_to_string(&mut out).unwrap();
            let status = match nix::sys::wait::waitpid(child, None).unwrap() {
                nix::sys::wait::WaitStatus::Exited(_, code) => code,
                other => panic!("child ended otherwise: {other:?}"),
            };
            (status, out)
        }
    }
}

#[test]
fn a_vcpu_thread_cannot_open_a_socket() {
    assert!(!allows(ThreadKind::Vcpu, libc::SYS_socket));
    // SAFETY: a plain system call with constant arguments.
    let (status, out) = in_filtered_child(ThreadKind::Vcpu, || unsafe {
        libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0)
    });
    assert_eq!(status, 128 + libc::SIGSYS, "{out}");
    assert_eq!(
        out,
        format!(
            "runvm: seccomp: the vcpu thread made system call {}, which its filter does not allow; the VM ends\n",
            libc::SYS_socket
        )
    );
}

#[test]
fn the_devices_thread_cannot_exec() {
    assert!(!allows(ThreadKind::Devices, libc::SYS_execve));
    // SAFETY: execve with null arguments; the filter stops it before the kernel looks.
    let (status, out) = in_filtered_child(ThreadKind::Devices, || unsafe {
        libc::syscall(libc::SYS_execve, 0usize, 0usize, 0usize)
    });
    assert_eq!(status, 128 + libc::SIGSYS, "{out}");
    assert!(
        out.contains("the devices thread made system call 59,"),
        "{out}"
    );
}

#[test]
fn listed_calls_pass() {
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::Supervisor,
    ] {
        // SAFETY: getpid has no arguments and cannot fail.
        let (status, out) = in_filtered_child(kind, || unsafe { libc::syscall(libc::SYS_getpid) });
        assert_eq!((status, out.as_str()), (0, ""), "{kind:?}");
    }
}

#[test]
fn modes_compile_and_enforce_is_the_default() {
    assert_eq!(SeccompMode::default(), SeccompMode::Enforce);
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::Supervisor,
    ] {
        assert!(compile(kind, SeccompMode::Enforce).unwrap().is_some());
        assert!(compile(kind, SeccompMode::Log).unwrap().is_some());
        assert!(compile(kind, SeccompMode::Off).unwrap().is_none());
    }
}

#[test]
fn the_supervisor_cannot_exec_mount_or_trace() {
    for nr in [
        libc::SYS_execve,
        libc::SYS_mount,
        libc::SYS_ptrace,
        libc::SYS_pivot_root,
    ] {
        assert!(!allows(ThreadKind::Supervisor, nr), "{nr}");
    }
    // SAFETY: mount with null arguments; the filter stops it before the kernel looks.
    let (status, out) = in_filtered_child(ThreadKind::Supervisor, || unsafe {
        libc::syscall(libc::SYS_mount, 0usize, 0usize, 0usize, 0usize, 0usize)
    });
    assert_eq!(status, 128 + libc::SIGSYS, "{out}");
    let expected = format!(
        "the supervisor thread made system call {},",
        libc::SYS_mount
    );
    assert!(out.contains(&expected), "{out}");
}

#[test]
fn the_supervisor_list_holds_every_thread_list() {
    // Filters stack: a vCPU or device thread runs under the supervisor's filter too.
    for kind in [ThreadKind::Vcpu, ThreadKind::Devices] {
        for g in groups(kind) {
            for &nr in g.calls {
                assert!(allows(ThreadKind::Supervisor, nr), "{kind:?} {nr}");
            }
        }
    }
}
