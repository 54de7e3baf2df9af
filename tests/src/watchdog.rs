//! A deadline for a whole test binary. A VM test that hangs (a guest that never answers, a
//! wait with no end) would otherwise hold CI until its global limit and say nothing about
//! where; the watchdog ends the binary instead, names it, and first kills the processes the
//! binary started (its direct children, by pid) so no VM outlives it.
//!
//! `RUNVM_TEST_BINARY_TIMEOUT` (seconds, default 1500) sets the deadline; 0 disables it.

use std::sync::Once;
use std::time::Duration;

const DEFAULT_SECS: u64 = 1500;
static ARM: Once = Once::new();

/// Starts the watchdog for this test binary, once; later calls do nothing.
pub fn arm() {
    ARM.call_once(|| {
        let secs = std::env::var("RUNVM_TEST_BINARY_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_SECS);
        if secs == 0 {
            return;
        }
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            expire(secs);
        });
    });
}

fn expire(secs: u64) -> ! {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    eprintln!(
        "runvm test watchdog: {exe} still running after {secs} s \
         (RUNVM_TEST_BINARY_TIMEOUT); killing its children and failing"
    );
    for pid in children() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::process::exit(124);
}

/// Direct children of every thread of this process.
fn children() -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}
