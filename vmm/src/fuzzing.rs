//! Entry points for fuzzing (`fuzz/`, and the stable smoke test that runs them on kept
//! inputs). The guest controls guest memory and every register access; whatever it
//! writes, the VMM must not panic, loop or grow without bound.
//!
//! [`mmio_vsock`] and [`mmio_fs`]: the vsock and virtio-fs devices behind their
//! virtio-mmio transport, the way a guest reaches them. The input's first 64 KiB become
//! guest memory (where descriptor tables, rings, packets and FUSE requests live); the rest
//! is a sequence of 7-byte operations: register writes and reads at any offset, queue
//! processing, host-side backend events. The virtio-fs share is a scratch directory with a
//! canary file beside it that no request may change.

use std::sync::{Arc, Mutex, OnceLock};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

use crate::bus::BusDevice;
use crate::devices::virtio::fs::passthrough::{share_server, ShareFs};
use crate::devices::virtio::fs::VirtioFs;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::unix::VsockMuxer;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::IrqLine;
use crate::memory::{create_guest_memory, GuestMemory};
use fuse_backend_rs::api::server::Server;

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

/// Removes this process's scratch directories (the smoke test calls it when done).
pub fn remove_scratch() {
    if let Some(dir) = socket_path().parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    if let Some((dir, _)) = FS_SCRATCH.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Guest memory from the input's head; the operations are the rest.
fn guest_memory(data: &[u8]) -> (GuestMemory, &[u8]) {
    let (mem_bytes, ops) = data.split_at(data.len().min(MEM_FROM_INPUT));
    let mem: GuestMemory = create_guest_memory(MEM_SIZE).expect("guest memory");
    mem.write_slice(mem_bytes, GuestAddress(0))
        .expect("fits in guest memory");
    (mem, ops)
}

/// Replays `ops` on `transport`; `work` runs the device for operations 3 and 4.
fn drive(transport: &mut MmioTransport, ops: &[u8], mut work: impl FnMut(u8)) {
    for op in ops.chunks_exact(7).take(MAX_OPS) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) % 0x200);
        let value = [op[3], op[4], op[5], op[6]];
        match op[0] % 5 {
            0 => transport.write(offset & !3, &value),
            1 => transport.read(offset & !3, &mut [0u8; 4]),
            2 => transport.write(offset, &value[..usize::from(op[3] % 4) + 1]),
            k => work(k),
        }
    }
}

fn transport(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemory) -> MmioTransport {
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new(5).expect("irq eventfd")));
    MmioTransport::new(device, mem, irq).expect("transport")
}

/// Runs one input through a fresh vsock device and transport.
pub fn mmio_vsock(data: &[u8]) {
    let (mem, ops) = guest_memory(data);
    let _ = std::fs::remove_file(socket_path());
    let muxer = VsockMuxer::new(3, socket_path()).expect("vsock muxer");
    let vsock = Arc::new(Mutex::new(Vsock::new(3, muxer).expect("vsock device")));
    let mut t = transport(vsock.clone(), mem);
    drive(&mut t, ops, |k| {
        let mut v = crate::bus::lock(&vsock);
        if k == 3 {
            v.process_tx();
            v.process_rx();
        } else {
            v.handle_backend_event(EventSet::IN);
        }
    });
}

const CANARY: &str = "outside the share";

/// The scratch share (with a file and a directory in it) and the canary beside it.
static FS_SCRATCH: OnceLock<(std::path::PathBuf, Arc<Server<ShareFs>>)> = OnceLock::new();

fn fs_scratch() -> &'static (std::path::PathBuf, Arc<Server<ShareFs>>) {
    FS_SCRATCH.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("runvm-fuzz-fs-{}", std::process::id()));
        let share = d.join("share");
        std::fs::create_dir_all(share.join("dir")).expect("fuzz share");
        std::fs::write(share.join("a.txt"), "in the share").expect("fuzz share file");
        std::fs::write(d.join("canary"), CANARY).expect("canary");
        let server = share_server(&share).expect("share server");
        (d, server)
    })
}

/// Runs one input through a fresh virtio-fs device over the scratch share; panics if the
/// canary outside the share changed.
pub fn mmio_fs(data: &[u8]) {
    fs_requests(data);
}

/// [`mmio_fs`], answering how many FUSE requests the device served.
fn fs_requests(data: &[u8]) -> u64 {
    let (mem, ops) = guest_memory(data);
    let (dir, server) = fs_scratch();
    let fs = Arc::new(Mutex::new(
        VirtioFs::new("share", server.clone()).expect("fs device"),
    ));
    let mut t = transport(fs.clone(), mem);
    drive(&mut t, ops, |k| {
        crate::bus::lock(&fs).process_queue(usize::from(k == 4));
    });
    let canary = std::fs::read_to_string(dir.join("canary")).unwrap_or_default();
    assert_eq!(
        canary, CANARY,
        "a guest request changed a file outside the share"
    );
    let served = crate::bus::lock(&fs).requests();
    #[allow(clippy::let_and_return)] // the guard must drop before `fs`
    served
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fs_seed_reaches_the_file_system() {
        let seed = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/seeds/mmio_fs/driver-init-fuse-init-lookup.bin"
        );
        let served = super::fs_requests(&std::fs::read(seed).unwrap());
        super::remove_scratch();
        assert_eq!(served, 2, "FUSE_INIT and LOOKUP");
    }
}
