//! The 8250 UART at COM1 (port 0x3f8, IRQ 4): the guest console. The register model is
//! vm-superio's; this module owns where the bytes go (stdout, a log file, nowhere) and the
//! watch on the console for the kernel's panic and power-off lines, which are the only
//! way a firmware-less guest tells the VMM about either.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::bus::BusDevice;
use crate::devices::IrqLine;

/// COM1 base port.
pub const COM1_BASE: u64 = 0x3f8;
/// Eight registers.
pub const COM1_LEN: u64 = 8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

const PANIC_MARKER: &str = "Kernel panic - not syncing";
const POWER_OFF_MARKER: &str = "reboot: Power down";
const MAX_LINE: usize = 512;

/// What the console has shown about the guest's fate.
#[derive(Debug, Default)]
pub struct ConsoleWatch {
    state: Mutex<WatchState>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct WatchState {
    panic: Option<String>,
    power_off: bool,
}

impl ConsoleWatch {
    /// The kernel's panic line, if it printed one.
    pub fn panic_message(&self) -> Option<String> {
        crate::bus::lock(&self.state).panic.clone()
    }

    /// Whether the kernel announced a power-off.
    pub fn powered_off(&self) -> bool {
        crate::bus::lock(&self.state).power_off
    }

    fn line(&self, line: &str) {
        let mut s = crate::bus::lock(&self.state);
        if let Some(pos) = line.find(PANIC_MARKER) {
            if s.panic.is_none() {
                s.panic = Some(line[pos..].trim_end().to_string());
            }
        } else if line.contains(POWER_OFF_MARKER) {
            s.power_off = true;
        }
    }
}

/// The console output: bytes go to `out` as they arrive; complete lines go to the watch.
pub struct ConsoleSink {
    out: Option<Box<dyn Write + Send>>,
    line: Vec<u8>,
    watch: Arc<ConsoleWatch>,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("has_out", &self.out.is_some())
            .finish()
    }
}

impl ConsoleSink {
    /// A sink writing to `out` (or nowhere) and reporting to `watch`.
    pub fn new(out: Option<Box<dyn Write + Send>>, watch: Arc<ConsoleWatch>) -> Self {
        ConsoleSink {
            out,
            line: Vec::new(),
            watch,
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(out) = self.out.as_mut() {
            // A console that cannot be written (closed stdout) must not stop the guest.
            let _ = out.write_all(buf).and_then(|_| out.flush());
        }
        for &b in buf {
            if b == b'\n' {
                self.watch.line(&String::from_utf8_lossy(&self.line));
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

/// The UART on the port I/O bus.
pub struct SerialDevice {
    uart: Serial<IrqLine, NoEvents, ConsoleSink>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `sink`.
    pub fn new(irq: IrqLine, sink: ConsoleSink) -> Self {
        SerialDevice {
            uart: Serial::new(irq, sink),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, *b) {
                log::warn!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (SerialDevice, Shared, Arc<ConsoleWatch>, IrqLine) {
        let out = Shared::default();
        let watch = Arc::new(ConsoleWatch::default());
        let irq = IrqLine::new(COM1_IRQ).unwrap();
        let irq2 = IrqLine {
            gsi: COM1_IRQ,
            evt: irq.eventfd().try_clone().unwrap(),
        };
        let dev = SerialDevice::new(
            irq,
            ConsoleSink::new(Some(Box::new(out.clone())), watch.clone()),
        );
        (dev, out, watch, irq2)
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let (mut dev, out, watch, _) = uart();
        for b in b"hello\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\n");
        assert_eq!(watch.panic_message(), None);
        // Line status register: transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn tx_interrupt_is_raised_when_enabled() {
        let (mut dev, _, _, irq) = uart();
        // IER: enable THR-empty interrupt.
        dev.write(1, &[0x02]);
        dev.write(0, b"x");
        assert!(irq.eventfd().read().unwrap() >= 1);
    }

    #[test]
    fn panic_and_power_off_lines_are_noticed() {
        let (mut dev, _, watch, _) = uart();
        for b in
            b"[    1.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n"
        {
            dev.write(0, &[*b]);
        }
        assert_eq!(
            watch.panic_message().as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
        );
        assert!(!watch.powered_off());
        let w2 = Arc::new(ConsoleWatch::default());
        let mut sink = ConsoleSink::new(None, w2.clone());
        sink.write_all(b"reboot: Power down\n").unwrap();
        assert!(w2.powered_off());
    }
}
