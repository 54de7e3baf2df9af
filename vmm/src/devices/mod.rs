//! Guest-visible devices: the legacy PC pieces a Linux guest needs (8250 serial, i8042
//! reset line) and the virtio-mmio transport with its devices.

pub mod i8042;
pub mod serial;
pub mod virtio;

use std::os::fd::AsRawFd;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line wired to the in-kernel irqchip through an irqfd: writing the eventfd
/// raises the line's GSI.
#[derive(Debug)]
pub struct IrqLine {
    gsi: u32,
    evt: EventFd,
}

impl IrqLine {
    /// A line for `gsi`. The VM registers [`IrqLine::eventfd`] as the irqfd for it.
    pub fn new(gsi: u32) -> std::io::Result<Self> {
        Ok(IrqLine {
            gsi,
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The GSI (IOAPIC pin) this line raises.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd to register as irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Raises the interrupt.
    pub fn raise(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.raise()
    }
}

impl AsRawFd for IrqLine {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.evt.as_raw_fd()
    }
}
