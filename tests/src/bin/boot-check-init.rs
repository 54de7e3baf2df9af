//! A static `/init` for the boot tests. It proves guest user space works end to end:
//! it prints, forks and execs a child (itself), waits for its exit status, reads a file
//! from the initramfs, and ends the VM with a reboot. With `boot_check=panic` on the
//! kernel command line (which the kernel hands to init as an environment variable) it
//! exits instead, which makes the kernel panic. With `boot_check=count` it counts instead:
//! a line `count N at T ms` (T: its CLOCK_MONOTONIC) every 200 ms up to 40, then the
//! reboot; the snapshot tests take a snapshot in the middle and restore it elsewhere.

use std::ffi::CString;
use std::io::Write;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "boot-check: {line}");
    let _ = out.flush();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        say(&format!("child running as pid {}", std::process::id()));
        std::process::exit(7);
    }
    say(&format!("init started as pid {}", std::process::id()));
    if std::env::var("boot_check").as_deref() == Ok("panic") {
        say("exiting to make the kernel panic");
        std::process::exit(3);
    }
    if std::env::var("boot_check").as_deref() == Ok("count") {
        count();
    }

    // SAFETY: fork in a single-threaded process; the child only calls execv or _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let path = CString::new("/init").unwrap();
        let arg0 = CString::new("/init").unwrap();
        let arg1 = CString::new("child").unwrap();
        let argv = [arg0.as_ptr(), arg1.as_ptr(), std::ptr::null()];
        // SAFETY: argv is a NULL-terminated array of valid C strings.
        unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
        // SAFETY: _exit is always safe to call.
        unsafe { libc::_exit(127) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    say(&format!("child exited with {}", libc::WEXITSTATUS(status)));

    match std::fs::read_to_string("/etc/boot-check") {
        Ok(s) => say(&format!("file says {}", s.trim())),
        Err(e) => say(&format!("cannot read /etc/boot-check: {e}")),
    }
    reboot();
}

fn reboot() -> ! {
    say("rebooting");
    // SAFETY: reboot(2) with a valid command; as PID 1 we hold CAP_SYS_BOOT.
    unsafe { libc::sync() };
    // SAFETY: see above.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    say("reboot failed");
    std::process::exit(1);
}

fn monotonic_ms() -> i64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec * 1000 + t.tv_nsec / 1_000_000
}

fn count() -> ! {
    for n in 1..=40 {
        say(&format!("count {n} at {} ms", monotonic_ms()));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    reboot();
}
