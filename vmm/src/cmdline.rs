//! The guest kernel command line: runvm's base switches, then the host profile's, then one
//! `virtio_mmio.device=` per device, then what the caller adds. Later switches win in
//! Linux, so the caller can override runvm's choices.

use linux_loader::cmdline::Cmdline;

use crate::host_profile::HostProfile;
use crate::memory::layout::CMDLINE_MAX_SIZE;

/// Switches every runvm guest gets.
///
/// - `console=ttyS0`: the 8250 UART is the only console.
/// - `reboot=k`: the agent ends the VM with a reboot, which the kernel performs through the
///   i8042 reset line; the VMM treats it as the VM's end.
/// - `panic=-1`: a panic reboots at once; the VMM tells it apart by the console's panic line.
/// - `quiet`: every console byte is a VM exit.
/// - `clocksource=kvm-clock`: the guest's clock is KVM's, which a restored VM sets back to
///   where the snapshot stopped it (`KVM_SET_CLOCK`). The kernel would otherwise move on
///   to the TSC, whose value some hosts cannot restore, and a restored guest's monotonic
///   clock would jump by the time the snapshot lay on disk.
/// - `i8042.noaux`-style probing is not needed: the kernel has no i8042 driver.
pub const BASE_ARGS: &[&str] = &[
    "console=ttyS0",
    "reboot=k",
    "panic=-1",
    "quiet",
    "clocksource=kvm-clock",
];

/// A virtio-mmio device as the kernel's command line describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceArg {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Errors building the command line.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("kernel command line is longer than {max} bytes")]
    TooLong { max: usize },
    #[error("kernel command line {arg:?} is not valid: {reason}")]
    Invalid { arg: String, reason: String },
}

/// Builds the full command line.
pub fn build(
    profile: &HostProfile,
    devices: &[MmioDeviceArg],
    extra: &str,
) -> Result<Cmdline, CmdlineError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| CmdlineError::Invalid {
        arg: String::new(),
        reason: e.to_string(),
    })?;
    let insert = |c: &mut Cmdline, arg: &str| {
        c.insert_str(arg).map_err(|e| match e {
            linux_loader::cmdline::Error::TooLarge => CmdlineError::TooLong {
                max: CMDLINE_MAX_SIZE,
            },
            e => CmdlineError::Invalid {
                arg: arg.to_string(),
                reason: e.to_string(),
            },
        })
    };
    for arg in BASE_ARGS {
        insert(&mut cmdline, arg)?;
    }
    for arg in profile.kernel_args() {
        insert(&mut cmdline, arg)?;
    }
    for d in devices {
        let arg = format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            d.size >> 10,
            d.base,
            d.irq
        );
        insert(&mut cmdline, &arg)?;
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        insert(&mut cmdline, extra)?;
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_profile::HostKind;

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn order_is_base_profile_devices_extra() {
        let hw = HostProfile::for_kind(HostKind::HardwareKvm);
        let c = build(
            &hw,
            &[MmioDeviceArg {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            }],
            "init=/bin/sh",
        )
        .unwrap();
        assert_eq!(
            text(&c),
            "console=ttyS0 reboot=k panic=-1 quiet clocksource=kvm-clock virtio_mmio.device=4K@0xd0000000:5 init=/bin/sh"
        );
        let sw = HostProfile::for_kind(HostKind::SoftwareKvm);
        let t = text(&build(&sw, &[], "").unwrap());
        assert!(
            t.starts_with(
                "console=ttyS0 reboot=k panic=-1 quiet clocksource=kvm-clock clearcpuid="
            ),
            "{t}"
        );
        assert!(t.contains(" noreplace-smp "), "{t}");
        assert!(t.ends_with("-AVX_Fast_Unaligned_Load"), "{t}");
    }

    #[test]
    fn overlong_lines_are_refused() {
        let hw = HostProfile::for_kind(HostKind::HardwareKvm);
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            build(&hw, &[], &long),
            Err(CmdlineError::TooLong { .. })
        ));
    }
}
