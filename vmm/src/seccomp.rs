//! Seccomp filters for the VMM's threads, the way Firecracker confines its own: the
//! threads that act on what a guest does (the vCPUs, which run the port I/O and MMIO
//! device models, and the device I/O thread, which runs the virtio backends) may make only
//! the system calls on their lists below. A call outside its thread's list ends the VMM:
//! a SIGSYS handler writes one line naming the thread and the call, then exits with
//! 128 + SIGSYS. `SeccompMode::Log` lets everything through but logs what is outside the
//! lists (to the kernel log), which is how the lists are checked against a workload.
//!
//! The lists live here alone, grouped with the reason each group is needed.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Whether and how the VMM's threads are filtered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// A call outside its thread's list ends the VMM (the default).
    #[default]
    Enforce,
    /// Calls outside the lists are allowed and logged by the kernel (to check the lists).
    Log,
    /// No filters (debugging only).
    Off,
}

/// The kinds of filtered threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: `KVM_RUN` and the exits it handles (UART, i8042, virtio-mmio registers).
    Vcpu,
    /// The device I/O thread: virtio queues, vsock sockets, the virtio-fs file system.
    Devices,
    /// The whole VMM process, installed on its first thread before any other exists so
    /// that every thread inherits it: the VM's construction, the control socket and its
    /// connections, the stdio relays, the signal thread. Filters stack (the strictest
    /// answer wins), so this list holds the vCPU's and the devices' lists too, and those
    /// threads add their own narrower filter on top.
    Supervisor,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::Supervisor => "supervisor",
        }
    }
}

/// Errors installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compiling the {kind} seccomp filter: {source}")]
    Compile {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind} seccomp filter: {source}")]
    Install {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("unblocking SIGSYS: {0}")]
    Signal(#[source] nix::Error),
}

/// A group of system calls and why a thread needs them.
struct Group {
    _why: &'static str,
    calls: &'static [libc::c_long],
}

/// What every filtered thread does as a Rust thread: memory, locks, signals, logging,
/// its own end.
const COMMON: &[Group] = &[
    Group {
        _why: "the allocator",
        calls: &[
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_mprotect,
        ],
    },
    Group {
        _why: "locks, condition variables, thread joins",
        calls: &[
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
        ],
    },
    Group {
        _why: "signals: the vCPU kick, SIGSYS reports, the blocked mask",
        calls: &[
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_tgkill,
            libc::SYS_gettid,
            libc::SYS_getpid,
        ],
    },
    Group {
        _why: "log lines and the console log (writes, rotation at its cap)",
        calls: &[
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_openat,
            libc::SYS_close,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_rename,
            libc::SYS_fchmod,
            libc::SYS_fcntl,
            libc::SYS_lseek,
        ],
    },
    Group {
        _why: "time and randomness (hash maps), when the vDSO is not used",
        calls: &[
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_getrandom,
        ],
    },
    Group {
        _why: "the thread's end, and the VMM's on a SIGSYS report",
        calls: &[
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_rseq,
            libc::SYS_prctl,
        ],
    },
];

/// A vCPU thread.
const VCPU: &[Group] = &[
    Group {
        _why: "KVM_RUN and the vCPU state read on an internal error",
        calls: &[libc::SYS_ioctl],
    },
    Group {
        _why: "queue notifications and interrupts (eventfds), the exit notifier",
        calls: &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll],
    },
];

/// The device I/O thread.
const DEVICES: &[Group] = &[
    Group {
        _why: "the devices end with the loop: the vsock socket file is removed",
        calls: &[libc::SYS_unlink],
    },
    Group {
        _why: "the event loop and eventfds",
        calls: &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_ioctl,
            libc::SYS_poll,
            libc::SYS_ppoll,
        ],
    },
    Group {
        _why: "vsock: the host Unix sockets it accepts and connects",
        calls: &[
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_socket,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
        ],
    },
    Group {
        _why: "virtio-fs: opening and reading the share",
        calls: &[
            libc::SYS_open_by_handle_at,
            libc::SYS_name_to_handle_at,
            libc::SYS_getdents64,
            libc::SYS_readlinkat,
            libc::SYS_pread64,
            libc::SYS_preadv,
            libc::SYS_preadv2,
            libc::SYS_fstatfs,
            libc::SYS_statfs,
            libc::SYS_dup,
            libc::SYS_flock,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
        ],
    },
    Group {
        _why: "virtio-fs: changing the share (the guest's writes, creates, renames, attributes)",
        calls: &[
            libc::SYS_pwrite64,
            libc::SYS_pwritev,
            libc::SYS_pwritev2,
            libc::SYS_ftruncate,
            libc::SYS_fallocate,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_mkdirat,
            libc::SYS_mknodat,
            libc::SYS_symlinkat,
            libc::SYS_linkat,
            libc::SYS_unlinkat,
            libc::SYS_renameat2,
            libc::SYS_fchmodat,
            libc::SYS_fchownat,
            libc::SYS_fchown,
            libc::SYS_utimensat,
            libc::SYS_copy_file_range,
        ],
    },
    Group {
        _why: "virtio-fs: extended attributes (capabilities and ACLs in images)",
        calls: &[
            libc::SYS_fgetxattr,
            libc::SYS_fsetxattr,
            libc::SYS_flistxattr,
            libc::SYS_fremovexattr,
            libc::SYS_getxattr,
            libc::SYS_setxattr,
            libc::SYS_listxattr,
            libc::SYS_removexattr,
            libc::SYS_lgetxattr,
            libc::SYS_lsetxattr,
            libc::SYS_llistxattr,
            libc::SYS_lremovexattr,
        ],
    },
    Group {
        _why: "virtio-fs: acting as the guest's caller (per-request credentials) and its umask",
        calls: &[
            libc::SYS_setresuid,
            libc::SYS_setresgid,
            libc::SYS_getuid,
            libc::SYS_getgid,
            libc::SYS_geteuid,
            libc::SYS_getegid,
            libc::SYS_capget,
            libc::SYS_capset,
            libc::SYS_umask,
            libc::SYS_setgroups,
        ],
    },
];

/// The VMM's own threads, beyond what the vCPUs and the devices do.
const SUPERVISOR: &[Group] = &[
    Group {
        _why: "starting threads (vCPUs, devices, relays, control connections), which then \
               add their own filter (a filter can only narrow what the thread may do)",
        calls: &[
            libc::SYS_seccomp,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
        ],
    },
    Group {
        _why: "the control socket, the agent's vsock connections, the console socket",
        calls: &[
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_socketpair,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
        ],
    },
    Group {
        _why: "the state directory: exit status, exec records, socket files and modes",
        calls: &[
            libc::SYS_unlinkat,
            libc::SYS_renameat,
            libc::SYS_mkdir,
            libc::SYS_chmod,
            libc::SYS_readlink,
            libc::SYS_access,
            libc::SYS_getcwd,
        ],
    },
    Group {
        _why: "stdio relays: pipes, terminals (modes, sizes), copies between descriptors",
        calls: &[
            libc::SYS_pipe2,
            libc::SYS_dup2,
            libc::SYS_dup3,
            libc::SYS_select,
            libc::SYS_pselect6,
            libc::SYS_sendfile,
            libc::SYS_splice,
        ],
    },
    Group {
        _why: "building the VM: KVM, guest memory, eventfds, the event loop",
        calls: &[
            libc::SYS_eventfd2,
            libc::SYS_epoll_create1,
            libc::SYS_memfd_create,
            libc::SYS_sysinfo,
            libc::SYS_uname,
            libc::SYS_prlimit64,
            libc::SYS_getrlimit,
        ],
    },
    Group {
        _why: "the signal thread and the vCPU kick's handler",
        calls: &[
            libc::SYS_rt_sigaction,
            libc::SYS_rt_sigtimedwait,
            libc::SYS_tkill,
            libc::SYS_getppid,
        ],
    },
];

fn groups(kind: ThreadKind) -> impl Iterator<Item = &'static Group> {
    let own: &[&[Group]] = match kind {
        ThreadKind::Vcpu => &[VCPU],
        ThreadKind::Devices => &[DEVICES],
        ThreadKind::Supervisor => &[VCPU, DEVICES, SUPERVISOR],
    };
    COMMON.iter().chain(own.iter().flat_map(|g| g.iter()))
}

/// Whether `kind`'s list has system call `nr`.
pub fn allows(kind: ThreadKind, nr: libc::c_long) -> bool {
    groups(kind).any(|g| g.calls.contains(&nr))
}

/// Compiles `kind`'s filter for `mode` (None: no filter).
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = groups(kind)
        .flat_map(|g| g.calls.iter())
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let err = |source| SeccompError::Compile {
        kind: kind.name(),
        source,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    Ok(Some(filter.try_into().map_err(err)?))
}

thread_local! {
    static KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// Where the SIGSYS report goes besides stderr (the VMM's log file), or -1.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);
/// Whether that file takes JSON lines.
static REPORT_JSON: AtomicBool = AtomicBool::new(false);

/// Sends SIGSYS reports to `fd` too, as JSON lines if `json` (`fd` must stay open for the
/// life of the process).
pub fn report_to(fd: i32, json: bool) {
    REPORT_JSON.store(json, Ordering::SeqCst);
    REPORT_FD.store(fd, Ordering::SeqCst);
}

/// Installs `kind`'s filter on the calling thread (and sets its no_new_privs).
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    let Some(bpf) = compile(kind, mode)? else {
        return Ok(());
    };
    install_compiled(kind, &bpf)
}

/// Installs an already compiled filter: no allocation, so it is safe after fork too.
pub fn install_compiled(kind: ThreadKind, bpf: &BpfProgram) -> Result<(), SeccompError> {
    init_reporter();
    KIND.with(|k| k.set(kind.name()));
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGSYS);
    set.thread_unblock().map_err(SeccompError::Signal)?;
    seccompiler::apply_filter(bpf).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })
}

fn init_reporter() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys) {
            log::warn!("seccomp: SIGSYS handler: {e}");
        }
    });
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64.
const SI_SYSCALL_OFFSET: usize = 24;

/// A line built without allocating (in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, s: &[u8]) -> &mut Self {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
        self
    }

    fn number(&mut self, mut v: u32) -> &mut Self {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn write_to(&self, fd: i32) {
        // SAFETY: writes a buffer of ours to a descriptor; a failure is ignored.
        let _ = unsafe { libc::write(fd, self.buf.as_ptr().cast(), self.len) };
    }
}

/// The SIGSYS report: one line, then the VMM's end. Only async-signal-safe work: no
/// allocation, no locks; the writes and the exit are on every list.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, whose si_syscall field is an
    // int at this offset on x86_64.
    let nr = unsafe { *((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32) };
    let mut msg = Line::new();
    msg.push(b"seccomp: the ")
        .push(KIND.with(|k| k.get()).as_bytes())
        .push(b" thread made system call ")
        .number(nr as u32)
        .push(b", which its filter does not allow; the VM ends");
    Line::new()
        .push(b"runvm: ")
        .push(msg.bytes())
        .push(b"\n")
        .write_to(2);
    let fd = REPORT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let mut line = Line::new();
        if REPORT_JSON.load(Ordering::SeqCst) {
            line.push(b"{\"level\":\"error\",\"msg\":\"")
                .push(msg.bytes())
                .push(b"\"}\n");
        } else {
            line.push(msg.bytes()).push(b"\n");
        }
        line.write_to(fd);
    }
    // SAFETY: ends the process at once, as the report promises.
    unsafe { libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS) };
}

#[cfg(test)]
mod tests;
