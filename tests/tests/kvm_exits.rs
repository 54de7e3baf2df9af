//! Real guest instructions through runvm's vCPU exit path, without a kernel: a few bytes
//! of real-mode code do port I/O, an MMIO write and an i8042 reset; a second program
//! loops so pause/resume/stop can be observed. Needs /dev/kvm.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use runvm_tests::{kvm_unavailable, skip_unless};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::bus::{Bus, BusDevice};
use vmm::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use vmm::exit::{ExitNotifier, VmExit};
use vmm::vcpu::{RunState, Vcpu, VcpuControl};
use vmm::vm::Vm;

#[derive(Default)]
struct Recorder {
    writes: Vec<(u64, Vec<u8>)>,
}

impl BusDevice for Recorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

const CODE_ADDR: u64 = 0x1000;

struct Guest {
    exit: Arc<ExitNotifier>,
    control: Arc<VcpuControl>,
    pio_rec: Arc<Mutex<Recorder>>,
    mmio_rec: Arc<Mutex<Recorder>>,
    thread: vmm::vcpu::VcpuThread,
    _vm: Vm,
}

/// Boots `code` in real mode at 0x1000 with a recorder on ports 0x3f8 and 0x80, an i8042,
/// and a recorder at MMIO 0x20000.
fn start(code: &[u8]) -> Guest {
    let vm = Vm::new().unwrap();
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    mem.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
    vm.register_memory(&mem).unwrap();
    vm.setup_irqchip().unwrap();

    let exit = Arc::new(ExitNotifier::new().unwrap());
    let pio_rec = Arc::new(Mutex::new(Recorder::default()));
    let mmio_rec = Arc::new(Mutex::new(Recorder::default()));
    let mut pio = Bus::new();
    pio.insert(pio_rec.clone(), 0x3f8, 8).unwrap();
    pio.insert(pio_rec.clone(), 0x80, 1).unwrap();
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        I8042_BASE,
        I8042_LEN,
    )
    .unwrap();
    let mut mmio = Bus::new();
    mmio.insert(mmio_rec.clone(), 0x20000, 0x1000).unwrap();

    vmm::vcpu::install_kick_handler().unwrap();
    let fd = vm.create_vcpu(0).unwrap();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    fd.set_sregs(&sregs).unwrap();
    fd.set_regs(&kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    let control = Arc::new(VcpuControl::new());
    let vcpu = Vcpu::new(
        0,
        fd,
        Arc::new(pio),
        Arc::new(mmio),
        exit.clone(),
        mem,
        control.clone(),
    );
    let thread = vcpu.spawn().unwrap();
    Guest {
        exit,
        control,
        pio_rec,
        mmio_rec,
        thread,
        _vm: vm,
    }
}

fn wait_exit(g: &Guest, timeout: Duration) -> Option<VmExit> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some(e) = g.exit.peek() {
            return Some(e);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Stops the vCPU with one request (one kick) and joins it, failing if it does not end.
fn finish(g: Guest) {
    g.control.set(RunState::Stopping);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !g.thread.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the vCPU did not stop after one kick"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    g.thread.join();
}

#[test]
fn port_io_mmio_and_reset_reach_their_devices() {
    skip_unless!(kvm_unavailable());
    #[rustfmt::skip]
    let code = [
        0xba, 0xf8, 0x03,             // mov dx, 0x3f8
        0xb0, b'O', 0xee,             // mov al, 'O'; out dx, al
        0xb0, b'K', 0xee,             // mov al, 'K'; out dx, al
        0xb8, 0x00, 0x20,             // mov ax, 0x2000
        0x8e, 0xd8,                   // mov ds, ax
        0xc6, 0x06, 0x10, 0x00, 0x5a, // mov byte [0x10], 0x5a   (0x20010)
        0xba, 0x64, 0x00,             // mov dx, 0x64
        0xb0, 0xfe, 0xee,             // mov al, 0xfe; out dx, al (i8042 reset)
        0xf4,                         // hlt (never reached)
    ];
    let g = start(&code);
    let exit = wait_exit(&g, Duration::from_secs(30));
    assert_eq!(exit, Some(VmExit::Reset));
    let pio = g.pio_rec.lock().unwrap().writes.clone();
    assert_eq!(pio, vec![(0, vec![b'O']), (0, vec![b'K'])]);
    let mmio = g.mmio_rec.lock().unwrap().writes.clone();
    assert_eq!(mmio, vec![(0x10, vec![0x5a])]);
    finish(g);
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    skip_unless!(kvm_unavailable());
    #[rustfmt::skip]
    let code = [
        0xba, 0x80, 0x00, // mov dx, 0x80
        0x31, 0xc0,       // xor ax, ax
        0x40,             // loop: inc ax
        0xee,             // out dx, al
        0xeb, 0xfc,       // jmp loop
    ];
    let g = start(&code);
    let count = |g: &Guest| g.pio_rec.lock().unwrap().writes.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count(&g) < 10 {
        assert!(std::time::Instant::now() < deadline, "guest never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    g.control.pause();
    let paused_at = count(&g);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count(&g), paused_at, "guest ran while paused");
    g.control.set(RunState::Running);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count(&g) <= paused_at {
        assert!(std::time::Instant::now() < deadline, "guest did not resume");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(g.exit.peek(), None);
    // Stopping kicks the vCPU out of KVM_RUN even though it never exits on its own.
    finish(g);
}

#[test]
fn one_kick_stops_a_guest_that_never_exits() {
    skip_unless!(kvm_unavailable());
    // jmp $: the vCPU stays in KVM_RUN until a kick takes it out.
    let g = start(&[0xeb, 0xfe]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.exit.peek(), None);
    let (c, (tx, rx)) = (g.control.clone(), std::sync::mpsc::channel());
    std::thread::spawn(move || {
        c.pause();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("pause never returned: the kick did not take the vCPU out of KVM_RUN");
    g.control.set(RunState::Running);
    finish(g);
}
