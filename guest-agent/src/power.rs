//! How the agent ends: as PID 1 it syncs and reboots, which runvm's VMM treats as the VM's
//! end; as a host process it exits.

/// What ending means for this agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// PID 1 of a VM: ending powers the VM off.
    Init,
    /// A host process: ending exits.
    Host,
}

impl Role {
    /// Ends the agent.
    pub fn end(self) -> ! {
        match self {
            Role::Init => power_off(),
            Role::Host => std::process::exit(0),
        }
    }
}

/// Ends the VM: file systems synced, then a reboot, which runvm treats as the VM's end.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Not reached unless reboot failed; PID 1 must not exit.
    loop {
        std::thread::park();
    }
}
