//! Entry points for fuzzing (`fuzz/`, and the stable smoke test that runs them on kept
//! inputs). The guest controls guest memory and every register access; whatever it
//! writes, the VMM must not panic, loop or grow without bound.
//!
//! [`mmio_vsock`]: the vsock device behind its virtio-mmio transport, the way a guest
//! reaches it. The input's first 64 KiB become guest memory (where descriptor tables,
//! rings and packets live); the rest is a sequence of 7-byte operations: register writes
//! and reads at any offset, queue processing, host-side backend events.

use std::sync::{Arc, Mutex, OnceLock};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

use crate::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::unix::VsockMuxer;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::IrqLine;
use crate::memory::{create_guest_memory, GuestMemory};

/// Guest memory of the harness: what the input fills, then zeroes.
const MEM_SIZE: u64 = 1 << 20;
const MEM_FROM_INPUT: usize = 64 << 10;
/// At most this many operations per input, so every input ends quickly.
const MAX_OPS: usize = 4096;

fn socket_path() -> &'static std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("runvm-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz socket directory");
        d.join("v.sock")
    })
}

/// Removes this process's socket directory (the smoke test calls it when done).
pub fn remove_scratch() {
    if let Some(dir) = socket_path().parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Runs one input through a fresh vsock device and transport.
pub fn mmio_vsock(data: &[u8]) {
    let (mem_bytes, ops) = data.split_at(data.len().min(MEM_FROM_INPUT));
    let mem: GuestMemory = create_guest_memory(MEM_SIZE).expect("guest memory");
    mem.write_slice(mem_bytes, GuestAddress(0))
        .expect("fits in guest memory");
    let _ = std::fs::remove_file(socket_path());
    let muxer = VsockMuxer::new(3, socket_path()).expect("vsock muxer");
    let vsock = Arc::new(Mutex::new(Vsock::new(3, muxer).expect("vsock device")));
    let device: Arc<Mutex<dyn VirtioDevice>> = vsock.clone();
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new(5).expect("irq eventfd")));
    let mut transport = MmioTransport::new(device, mem, irq).expect("transport");
    for op in ops.chunks_exact(7).take(MAX_OPS) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) % 0x200);
        let value = [op[3], op[4], op[5], op[6]];
        match op[0] % 5 {
            0 => transport.write(offset & !3, &value),
            1 => transport.read(offset & !3, &mut [0u8; 4]),
            2 => transport.write(offset, &value[..usize::from(op[3] % 4) + 1]),
            3 => {
                let mut v = crate::bus::lock(&vsock);
                v.process_tx();
                v.process_rx();
            }
            _ => crate::bus::lock(&vsock).handle_backend_event(EventSet::IN),
        }
    }
}
