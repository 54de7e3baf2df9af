//! The 8250 UART at COM1 (port 0x3f8, IRQ 4): the guest console. The register model is
//! vm-superio's; this module owns where the bytes go (stdout, a log file, nowhere) and the
//! watch on the console for the kernel's panic and power-off lines, which are the only
//! way a firmware-less guest tells the VMM about either.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as UartState};
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

/// What the console has shown about the guest's fate, and whether a line a caller
/// waits for came.
#[derive(Debug, Default)]
pub struct ConsoleWatch {
    state: Mutex<WatchState>,
    changed: Condvar,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct WatchState {
    panic: Option<String>,
    power_off: bool,
    marker: Option<String>,
    marker_seen: bool,
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

    /// From now on, notes a line that contains `marker` (see [`ConsoleWatch::wait_marker`]).
    pub fn watch_for(&self, marker: &str) {
        let mut s = crate::bus::lock(&self.state);
        s.marker = Some(marker.to_string());
        s.marker_seen = false;
    }

    /// Waits up to `timeout` for the line [`ConsoleWatch::watch_for`] named; whether it came.
    pub fn wait_marker(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = crate::bus::lock(&self.state);
        while !s.marker_seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }

    fn line(&self, line: &str) {
        let mut s = crate::bus::lock(&self.state);
        if s.marker.as_deref().is_some_and(|m| line.contains(m)) {
            s.marker_seen = true;
            self.changed.notify_all();
        }
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

/// The UART's registers and receive FIFO, as a snapshot keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `sink`.
    pub fn new(irq: IrqLine, sink: ConsoleSink) -> Self {
        SerialDevice {
            uart: Serial::new(irq, sink),
        }
    }

    /// A UART in the saved state `s` (an interrupt it had pending is raised again).
    pub fn from_state(
        s: &SerialState,
        irq: IrqLine,
        sink: ConsoleSink,
    ) -> Result<Self, vm_superio::serial::Error<std::io::Error>> {
        let state = UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        Serial::from_state(&state, irq, NoEvents, sink).map(|uart| SerialDevice { uart })
    }

    /// Raises the interrupt line again if the UART has an interrupt pending (after a
    /// restore has set the interrupt controllers' state, which a raise made before would
    /// not survive).
    pub fn reassert_interrupt(&self) -> std::io::Result<()> {
        // IIR bit 0 clear: an interrupt is pending.
        if self.uart.state().interrupt_identification & 0x01 == 0 {
            self.uart.interrupt_evt().raise()?;
        }
        Ok(())
    }

    /// The UART's state.
    pub fn state(&self) -> SerialState {
        let u = self.uart.state();
        SerialState {
            baud_divisor_low: u.baud_divisor_low,
            baud_divisor_high: u.baud_divisor_high,
            interrupt_enable: u.interrupt_enable,
            interrupt_identification: u.interrupt_identification,
            line_control: u.line_control,
            line_status: u.line_status,
            modem_control: u.modem_control,
            modem_status: u.modem_status,
            scratch: u.scratch,
            in_buffer: u.in_buffer,
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
    fn state_round_trips_with_a_pending_interrupt() {
        let (mut dev, _, watch, irq) = uart();
        dev.write(3, &[0x03]); // LCR: 8 bits
        dev.write(7, &[0x5a]); // scratch
        dev.write(1, &[0x02]); // IER: THR empty
        let _ = irq.eventfd().read();
        let saved = dev.state();
        assert_eq!((saved.line_control, saved.scratch), (0x03, 0x5a));
        let line = IrqLine::new(COM1_IRQ).unwrap();
        let evt = line.eventfd().try_clone().unwrap();
        let mut restored =
            SerialDevice::from_state(&saved, line, ConsoleSink::new(None, watch)).unwrap();
        assert_eq!(restored.state(), saved);
        assert!(
            evt.read().unwrap() >= 1,
            "the pending THR interrupt is raised"
        );
        let mut scratch = [0u8];
        restored.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
    }

    #[test]
    fn a_watched_line_is_reported() {
        let (mut dev, _, watch, _) = uart();
        watch.watch_for("count 3");
        assert!(!watch.wait_marker(Duration::from_millis(10)));
        for b in b"count 2\ncount 3\n" {
            dev.write(0, &[*b]);
        }
        assert!(watch.wait_marker(Duration::from_millis(10)));
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
