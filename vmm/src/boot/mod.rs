//! Putting a kernel into guest memory: load the image (ELF `vmlinux` with or without a PVH
//! note, or `bzImage`), place the initramfs at the top of low RAM, write the command line,
//! the boot parameters of the chosen protocol and the MP table.

pub mod linux;
pub mod mptable;
pub mod pvh;
pub mod regs;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{self, Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _};

use crate::memory::{layout, low_ram_end, GuestMemory};
pub use regs::EntryMode;

/// Where the initramfs was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initrd {
    pub address: GuestAddress,
    pub size: u64,
}

/// A kernel in guest memory, ready to enter.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub mode: EntryMode,
    pub entry: GuestAddress,
    /// First byte after the kernel image.
    pub end: u64,
    /// bzImage setup header, for the zero page.
    pub setup_header: Option<setup_header>,
}

/// Errors while loading the kernel and its boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a kernel: neither an x86_64 ELF vmlinux nor a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}: {reason}")]
    KernelLoad { path: PathBuf, reason: String },
    #[error("cannot read initramfs {path}: {source}")]
    InitrdOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel ({free} bytes free)")]
    InitrdTooLarge { path: PathBuf, size: u64, free: u64 },
    #[error("writing the command line to guest memory: {0}")]
    Cmdline(String),
    #[error("writing boot parameters: {0}")]
    BootParams(String),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// Checks that `path` starts like a kernel runvm can boot (ELF or bzImage), without
/// loading it, so a wrong file fails before any VM resource exists.
pub fn check_kernel_format(path: &Path) -> Result<(), BootError> {
    use std::io::{Read, Seek, SeekFrom};
    let open_err = |source| BootError::KernelOpen {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(open_err)?;
    let mut magic = [0u8; 4];
    let is_elf = f.read_exact(&mut magic).is_ok() && &magic == b"\x7fELF";
    let is_bzimage = !is_elf && {
        let mut hdr = [0u8; 4];
        f.seek(SeekFrom::Start(0x202)).is_ok() && f.read_exact(&mut hdr).is_ok() && &hdr == b"HdrS"
    };
    if is_elf || is_bzimage {
        Ok(())
    } else {
        Err(BootError::NotAKernel {
            path: path.to_path_buf(),
        })
    }
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.to_path_buf(),
        source,
    })?;
    let load_err = |e: linux_loader::loader::Error| BootError::KernelLoad {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    match Elf::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIMEM_START)),
    ) {
        Ok(r) => {
            let (mode, entry) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (EntryMode::Pvh, addr),
                _ => (EntryMode::Linux64, r.kernel_load),
            };
            Ok(LoadedKernel {
                mode,
                entry,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        Err(linux_loader::loader::Error::Elf(elf::Error::InvalidElfMagicNumber)) => {
            let r = BzImage::load(
                mem,
                None,
                &mut file,
                Some(GuestAddress(layout::HIMEM_START)),
            )
            .map_err(|e| match e {
                linux_loader::loader::Error::Bzimage(
                    linux_loader::loader::bzimage::Error::InvalidBzImage,
                ) => BootError::NotAKernel {
                    path: path.to_path_buf(),
                },
                e => load_err(e),
            })?;
            Ok(LoadedKernel {
                mode: EntryMode::Linux64,
                // The 64-bit entry point of a bzImage is 0x200 past its protected-mode start.
                entry: r.kernel_load.unchecked_add(0x200),
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
        Err(linux_loader::loader::Error::Elf(
            elf::Error::BigEndianElfOnLittle
            | elf::Error::InvalidProgramHeaderSize
            | elf::Error::InvalidProgramHeaderOffset
            | elf::Error::ReadElfHeader,
        )) => Err(BootError::NotAKernel {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(load_err(e)),
    }
}

/// Places the initramfs at `path` at the top of low RAM, page aligned, above `kernel_end`.
pub fn load_initrd(mem: &GuestMemory, path: &Path, kernel_end: u64) -> Result<Initrd, BootError> {
    let open_err = |source| BootError::InitrdOpen {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let top = low_ram_end(mem.last_addr().raw_value() + 1);
    let free = top.saturating_sub(kernel_end);
    if size > free || size > u64::from(u32::MAX) {
        return Err(BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            free,
        });
    }
    let address = (top - size) & !0xfff;
    if address < kernel_end {
        return Err(BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            free,
        });
    }
    mem.read_exact_volatile_from(GuestAddress(address), &mut file, size as usize)
        .map_err(|e| BootError::InitrdOpen {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(Initrd {
        address: GuestAddress(address),
        size,
    })
}

/// Writes the command line, the protocol's boot parameters and the MP table.
pub fn write_boot_data(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<&Initrd>,
    vcpus: u8,
) -> Result<(), BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let mem_size = total_ram(mem);
    match kernel.mode {
        EntryMode::Pvh => pvh::write(mem, mem_size, initrd)?,
        EntryMode::Linux64 => {
            let len = cmdline
                .as_cstring()
                .map(|c| c.as_bytes().len())
                .map_err(|e| BootError::Cmdline(e.to_string()))?;
            linux::write(mem, kernel.setup_header, mem_size, len, initrd)?
        }
    }
    mptable::setup(mem, vcpus)?;
    Ok(())
}

fn total_ram(mem: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryRegion;
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("runvm-boot-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn missing_and_bogus_kernels_are_named() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let e = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(e, BootError::KernelOpen { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/vmlinux"));
        let p = tmp("text", &[b'x'; 4096]);
        let e = load_kernel(&mem, &p).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel { .. }), "{e}");
        assert!(matches!(
            check_kernel_format(&p),
            Err(BootError::NotAKernel { .. })
        ));
        let mut bz = vec![0u8; 4096];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&p, &bz).unwrap();
        check_kernel_format(&p).unwrap();
        std::fs::write(&p, b"\x7fELF....").unwrap();
        check_kernel_format(&p).unwrap();
        std::fs::remove_file(p).unwrap();
        let p = tmp("empty", b"");
        assert!(load_kernel(&mem, &p).is_err());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let p = tmp("initrd", &[7u8; 10000]);
        let i = load_initrd(&mem, &p, 0x200_0000).unwrap();
        assert_eq!(i.size, 10000);
        assert_eq!(i.address.0 % 4096, 0);
        assert!(i.address.0 + i.size <= 64 << 20);
        assert!(i.address.0 + i.size > (64 << 20) - 8192);
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, i.address).unwrap();
        assert_eq!(b, [7; 4]);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let mem = crate::memory::create_guest_memory(32 << 20).unwrap();
        let p = tmp("big", &vec![0u8; 20 << 20]);
        let e = load_initrd(&mem, &p, 0x100_0000 + (8 << 20)).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooLarge { .. }), "{e}");
        std::fs::remove_file(p).unwrap();
        let e = load_initrd(&mem, Path::new("/nonexistent/initrd"), 0).unwrap_err();
        assert!(matches!(e, BootError::InitrdOpen { .. }));
    }
}
