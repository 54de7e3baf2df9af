//! Linux 64-bit boot protocol parameters (the "zero page", `boot_params`): setup header,
//! command line pointer, initramfs and E820 map, written where `rsi` points at entry.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::GuestAddress;

use super::{BootError, Initrd};
use crate::memory::{layout, memory_map, GuestMemory};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Builds `boot_params` from the kernel's own setup header (bzImage) or a minimal one
/// (vmlinux without a PVH note).
pub fn build(
    header: Option<setup_header>,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<&Initrd>,
) -> boot_params {
    let mut params = boot_params {
        hdr: header.unwrap_or(setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.address.0 as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let map = memory_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.start,
            size: e.size,
            type_: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    params
}

/// Writes the zero page to guest memory.
pub fn write(
    mem: &GuestMemory,
    header: Option<setup_header>,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<&Initrd>,
) -> Result<(), BootError> {
    let params = build(header, mem_size, cmdline_len, initrd);
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::BootParams(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let initrd = Initrd {
            address: GuestAddress(0x600_0000),
            size: 4096,
        };
        let p = build(None, 5 << 30, 42, Some(&initrd));
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr } as u64, layout::CMDLINE_START);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x600_0000, 4096)
        );
        assert_eq!(p.e820_entries, 4);
        let e = p.e820_table[3];
        assert_eq!(
            ({ e.addr }, { e.size }),
            (layout::MMIO_GAP_END, (5 << 30) - layout::MMIO_GAP_START)
        );
        let reserved = p.e820_table[1];
        assert_eq!({ reserved.type_ }, 2);
    }

    #[test]
    fn bzimage_header_is_kept() {
        let h = setup_header {
            version: 0x20f,
            setup_sects: 30,
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            ..Default::default()
        };
        let p = build(Some(h), 64 << 20, 1, None);
        let hdr = p.hdr;
        assert_eq!(({ hdr.version }, { hdr.setup_sects }), (0x20f, 30));
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.ramdisk_size }, 0);
    }
}
