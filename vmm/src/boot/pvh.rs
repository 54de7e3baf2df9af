//! PVH boot parameters: the `hvm_start_info` block, the memory map table and the module
//! list (the initramfs), written where `rbx` points at entry.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::{BootError, Initrd};
use crate::memory::{layout, memory_map, GuestMemory};

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Builds the PVH start info, memory map and module list for a guest of `mem_size` bytes.
pub fn build(
    mem_size: u64,
    initrd: Option<&Initrd>,
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Option<hvm_modlist_entry>,
) {
    let memmap: Vec<_> = memory_map(mem_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.start,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let module = initrd.map(|i| hvm_modlist_entry {
        paddr: i.address.0,
        size: i.size,
        ..Default::default()
    });
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        nr_modules: u32::from(module.is_some()),
        modlist_paddr: if module.is_some() {
            layout::PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    (info, memmap, module)
}

/// Writes the PVH boot parameters to guest memory.
pub fn write(mem: &GuestMemory, mem_size: u64, initrd: Option<&Initrd>) -> Result<(), BootError> {
    let (info, memmap, module) = build(mem_size, initrd);
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    if let Some(m) = module {
        params.set_modules(&[m], GuestAddress(layout::PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(|e| BootError::BootParams(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn start_info_points_at_map_cmdline_and_initrd() {
        let mem = crate::memory::create_guest_memory(128 << 20).unwrap();
        let initrd = Initrd {
            address: GuestAddress(0x700_0000),
            size: 0x1234,
        };
        write(&mem, 128 << 20, Some(&initrd)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.cmdline_paddr, layout::CMDLINE_START);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x700_0000, 0x1234));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                info.memmap_paddr + 2 * std::mem::size_of::<hvm_memmap_table_entry>() as u64,
            ))
            .unwrap();
        assert_eq!(last.addr + last.size, 128 << 20);
        assert_eq!(last.type_, 1);
    }

    #[test]
    fn no_initrd_means_no_modules() {
        let (info, _, m) = build(64 << 20, None);
        assert_eq!(info.nr_modules, 0);
        assert_eq!(info.modlist_paddr, 0);
        assert!(m.is_none());
    }
}
