//! The Intel MultiProcessor Specification table (v1.4) that tells the guest kernel how
//! many CPUs exist, where the IOAPIC is and how ISA interrupts 0-23 are routed. With no
//! ACPI, this is how an x86 kernel finds its vCPUs.
//!
//! The table is serialized byte by byte (all fields little endian), which keeps it free of
//! packed structs.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::{layout, GuestMemory};

const APIC_VERSION: u8 = 0x14;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_FPU: u32 = 1;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const MPC_APIC_USABLE: u8 = 1;
const FLOATING_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in the MP table (at most 254)")]
    TooManyCpus(u8),
    #[error("the MP table does not fit in its {max} byte area ({size} bytes)")]
    TooLarge { size: usize, max: u64 },
    #[error("writing the MP table to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC's id: one past the last CPU's APIC id.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus + 1
}

/// Builds the floating pointer and the configuration table for `num_cpus` CPUs, for
/// placement at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic = ioapic_id(num_cpus);
    let table_addr = base + FLOATING_SIZE as u64;

    // Entries after the header.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION]);
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.push(flags);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic, APIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..=layout::IRQ_MAX as u8 {
        // Type, interrupt type, flags (conforming polarity and trigger), bus, bus irq,
        // destination IOAPIC, destination pin.
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic, irq]);
        count += 1;
    }
    // LINT0 of every local APIC is ExtINT (the legacy PIC), LINT1 is NMI.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_SIZE + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"RUNVM   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    debug_assert_eq!(table.len(), HEADER_SIZE);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_SIZE);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // spec revision 1.4
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: configuration table present
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    if out.len() as u64 > layout::MPTABLE_MAX_SIZE {
        return Err(MpTableError::TooLarge {
            size: out.len(),
            max: layout::MPTABLE_MAX_SIZE,
        });
    }
    Ok(out)
}

/// Writes the MP table for `num_cpus` CPUs at its fixed place in guest memory.
pub fn setup(mem: &GuestMemory, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(num_cpus, layout::MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn entries(table: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut off = HEADER_SIZE;
        while off < table.len() {
            let len = if table[off] == MP_PROCESSOR { 20 } else { 8 };
            out.push(&table[off..off + len]);
            off += len;
        }
        out
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for cpus in [1u8, 2, 64, 254] {
            let b = build(cpus, layout::MPTABLE_START).unwrap();
            let (floating, table) = b.split_at(FLOATING_SIZE);
            assert_eq!(&floating[..4], b"_MP_");
            assert_eq!(sum(floating), 0);
            let ptr = u32::from_le_bytes(floating[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, layout::MPTABLE_START + FLOATING_SIZE as u64);
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(
                u16::from_le_bytes([table[4], table[5]]) as usize,
                table.len()
            );
            assert_eq!(sum(table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(entries(table).len(), count);
        }
    }

    #[test]
    fn describes_cpus_ioapic_and_interrupts() {
        let b = build(4, layout::MPTABLE_START).unwrap();
        let e = entries(&b[FLOATING_SIZE..]);
        let cpus: Vec<_> = e.iter().filter(|e| e[0] == MP_PROCESSOR).collect();
        assert_eq!(cpus.len(), 4);
        assert_eq!(
            cpus.iter()
                .filter(|c| c[3] & CPU_BOOTPROCESSOR != 0)
                .count(),
            1
        );
        assert_eq!(
            cpus.iter().map(|c| c[1]).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        let ioapic: Vec<_> = e.iter().filter(|e| e[0] == MP_IOAPIC).collect();
        assert_eq!(ioapic.len(), 1);
        assert_eq!(ioapic[0][1], 5);
        assert_eq!(
            u32::from_le_bytes(ioapic[0][4..8].try_into().unwrap()) as u64,
            layout::IOAPIC_START
        );
        let irqs: Vec<u8> = e
            .iter()
            .filter(|e| e[0] == MP_INTSRC)
            .map(|e| e[7])
            .collect();
        assert_eq!(irqs, (0..=23).collect::<Vec<u8>>());
        assert_eq!(e.iter().filter(|e| e[0] == MP_LINTSRC).count(), 2);
    }

    #[test]
    fn rejects_impossible_cpu_counts() {
        assert!(matches!(build(0, 0), Err(MpTableError::TooManyCpus(0))));
        assert!(matches!(build(255, 0), Err(MpTableError::TooManyCpus(255))));
    }
}
