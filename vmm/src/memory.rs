//! Guest physical memory: the fixed layout of boot structures, the RAM regions around the
//! 32-bit MMIO gap, and the E820-style map handed to the kernel.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Layout of the first megabyte and of the MMIO gap.
pub mod layout {
    /// GDT used for the first instructions (before the kernel loads its own).
    pub const BOOT_GDT_START: u64 = 0x500;
    /// An empty IDT.
    pub const BOOT_IDT_START: u64 = 0x520;
    /// PVH `hvm_start_info`.
    pub const PVH_INFO_START: u64 = 0x6000;
    /// PVH module list (the initramfs).
    pub const PVH_MODLIST_START: u64 = 0x6040;
    /// PVH memory map table.
    pub const PVH_MEMMAP_START: u64 = 0x6100;
    /// Linux boot protocol zero page (`boot_params`), for bzImage boot.
    pub const ZERO_PAGE_START: u64 = 0x7000;
    /// Initial stack pointer for 64-bit entry.
    pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
    /// Identity-mapping page tables for 64-bit entry.
    pub const PML4_START: u64 = 0x9000;
    pub const PDPTE_START: u64 = 0xa000;
    pub const PDE_START: u64 = 0xb000;
    /// Kernel command line.
    pub const CMDLINE_START: u64 = 0x20000;
    /// x86 kernels accept at most 2048 bytes of command line.
    pub const CMDLINE_MAX_SIZE: usize = 2048;
    /// End of conventional memory: the EBDA and BIOS areas up to 1 MiB are reserved.
    pub const EBDA_START: u64 = 0x9fc00;
    /// The MP floating pointer and table, in the BIOS area the kernel scans.
    pub const MPTABLE_START: u64 = 0xf0000;
    /// Size of the BIOS area reserved for the MP table.
    pub const MPTABLE_MAX_SIZE: u64 = 0x10000;
    /// First byte above the legacy area.
    pub const HIMEM_START: u64 = 0x10_0000;
    /// The 32-bit MMIO gap: devices, IOAPIC, LAPIC. RAM continues at 4 GiB.
    pub const MMIO_GAP_START: u64 = 0xc000_0000;
    pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
    /// virtio-mmio device windows, one 4 KiB page each.
    pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
    pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
    /// IOAPIC and local APIC addresses (fixed by the architecture).
    pub const IOAPIC_START: u64 = 0xfec0_0000;
    pub const APIC_START: u64 = 0xfee0_0000;
    /// First interrupt line free for devices (0-4 are timer, keyboard, cascade, COM2, COM1).
    pub const IRQ_BASE: u32 = 5;
    /// Last IOAPIC input pin.
    pub const IRQ_MAX: u32 = 23;

    // The stack grows down between the zero page and the page tables; the command line
    // ends before the reserved EBDA.
    const _: () =
        assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
    const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
}

/// Kind of a memory-map entry, with the E820 type values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub size: u64,
    pub kind: RegionKind,
}

/// The RAM regions backing a guest of `size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(layout::MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if size > low {
        regions.push((GuestAddress(layout::MMIO_GAP_END), (size - low) as usize));
    }
    regions
}

/// Allocates guest memory of `size` bytes.
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, vm_memory::mmap::FromRangesError> {
    GuestMemoryMmap::from_ranges(&ram_regions(size))
}

/// End (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(layout::MMIO_GAP_START)
}

/// The physical memory map for a guest of `size` bytes, as the kernel should see it.
pub fn memory_map(size: u64) -> Vec<MapEntry> {
    let low_end = low_ram_end(size);
    let mut map = vec![
        MapEntry {
            start: 0,
            size: layout::EBDA_START,
            kind: RegionKind::Ram,
        },
        MapEntry {
            start: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: RegionKind::Reserved,
        },
        MapEntry {
            start: layout::HIMEM_START,
            size: low_end - layout::HIMEM_START,
            kind: RegionKind::Ram,
        },
    ];
    if size > low_end {
        map.push(MapEntry {
            start: layout::MMIO_GAP_END,
            size: size - low_end,
            kind: RegionKind::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemory as _;

    #[test]
    fn small_guest_is_one_region() {
        let r = ram_regions(128 << 20);
        assert_eq!(r, vec![(GuestAddress(0), 128 << 20)]);
        let m = memory_map(128 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].start + m[0].size, layout::EBDA_START);
        assert_eq!(m[2].start, layout::HIMEM_START);
        assert_eq!(m[2].start + m[2].size, 128 << 20);
        assert!(
            m.iter()
                .filter(|e| e.kind == RegionKind::Ram)
                .map(|e| e.size)
                .sum::<u64>()
                < 128 << 20
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let size = 4u64 << 30;
        let r = ram_regions(size);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1 as u64, layout::MMIO_GAP_START);
        assert_eq!(r[1].0, GuestAddress(layout::MMIO_GAP_END));
        assert_eq!(r[0].1 as u64 + r[1].1 as u64, size);
        let m = memory_map(size);
        let last = m.last().unwrap();
        assert_eq!(last.start, layout::MMIO_GAP_END);
        assert_eq!(last.size, size - layout::MMIO_GAP_START);
        // No RAM inside the gap.
        for e in &m {
            assert!(e.start + e.size <= layout::MMIO_GAP_START || e.start >= layout::MMIO_GAP_END);
        }
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        use layout::*;
        let mut areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (PVH_MEMMAP_START, 0x100),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, MPTABLE_MAX_SIZE),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
    }

    #[test]
    fn memory_is_allocated() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
