//! The i8042 keyboard controller, reduced to what a guest without a keyboard uses: the
//! "pulse reset line" command (0xFE to port 0x64) that `reboot=k` sends. The reset ends
//! the VM (see `exit`).

use std::sync::Arc;

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, VmExit};

/// Port of the data register; the command/status register is at +4.
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_LEN: u64 = 5;

/// Reports a guest reset to the VM's exit notifier.
#[derive(Debug)]
pub struct ResetTrigger {
    exit: Arc<ExitNotifier>,
}

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.exit.report(VmExit::Reset);
        Ok(())
    }
}

/// The i8042 on the port I/O bus.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// An i8042 whose reset command reports [`VmExit::Reset`].
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        I8042 {
            inner: I8042Device::new(ResetTrigger { exit }),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (the kernel's kb_wait passes).
        if let Some(b) = data.first_mut() {
            *b = self.inner.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            let Ok(()) = self.inner.write(offset as u8, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_reports_reset() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[0xfe]);
        assert_eq!(exit.peek(), None);
        dev.write(4, &[0xd1]);
        assert_eq!(exit.peek(), None);
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.peek(), Some(VmExit::Reset));
    }
}
