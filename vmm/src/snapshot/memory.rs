//! The memory file of a snapshot: one header page, then every RAM region of the guest in
//! order. Pages that hold only zeros are left as holes, so a freshly booted guest's file
//! takes the disk space of what it touched. Restoring maps the regions `MAP_PRIVATE`:
//! every VM restored from the file shares its page cache and copies only the pages it
//! writes.
//!
//! The header holds a magic string, the format version, the id of the state file it
//! belongs to and the memory size, so a file of another snapshot, or a truncated one, is
//! refused before it is mapped.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::{
    mmap::MmapRegionBuilder, Bytes, FileOffset, GuestAddress, GuestMemory as _, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::{RegionState, SnapshotError, FORMAT_VERSION};
use crate::memory::GuestMemory;

/// Size of the header before the first region (one page, so regions stay page-aligned).
pub const HEADER_LEN: u64 = 4096;
const MAGIC: &[u8; 16] = b"runvm-vm-memory\0";
const PAGE: usize = 4096;
/// Bytes copied out of guest memory at a time.
const CHUNK: usize = 1 << 20;

fn header(id: &str, total: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[..16].copy_from_slice(MAGIC);
    h[16..20].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[24..32].copy_from_slice(&total.to_le_bytes());
    let id = id.as_bytes();
    let n = id.len().min(64);
    h[32..32 + n].copy_from_slice(&id[..n]);
    h
}

/// Writes `mem` to a new file at `path` (mode 0600, never an existing file) behind a
/// header naming `id`; returns where each region went.
pub fn save(mem: &GuestMemory, path: &Path, id: &str) -> Result<Vec<RegionState>, SnapshotError> {
    let io = |what| SnapshotError::io(what, path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io("creating"))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.write_all(&header(id, total)).map_err(io("writing"))?;
    let mut regions = Vec::new();
    let mut offset = HEADER_LEN;
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        regions.push(RegionState {
            guest_addr: start,
            size: len,
            file_offset: offset,
        });
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min((len - done) as usize);
            mem.read_slice(&mut buf[..n], GuestAddress(start + done))
                .map_err(SnapshotError::ReadMemory)?;
            write_sparse(&file, &buf[..n], offset + done).map_err(io("writing"))?;
            done += n as u64;
        }
        offset += len;
    }
    file.set_len(offset).map_err(io("sizing"))?;
    file.sync_all().map_err(io("syncing"))?;
    Ok(regions)
}

/// Writes the pages of `data` that are not all zeros at `offset`, in runs.
fn write_sparse(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    let mut run_start: Option<usize> = None;
    for (i, page) in data.chunks(PAGE).enumerate() {
        let zero = page.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i * PAGE),
            (true, Some(s)) => {
                file.write_all_at(&data[s..i * PAGE], offset + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run_start {
        file.write_all_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

/// An opened memory file whose header matched its state.
#[derive(Debug)]
pub struct MemoryFile {
    path: PathBuf,
    file: File,
    regions: Vec<RegionState>,
}

impl MemoryFile {
    /// Opens `path` and checks it belongs to the state with `id` and `regions`: header,
    /// format, id, and a size that covers every region.
    pub fn open(path: &Path, id: &str, regions: &[RegionState]) -> Result<Self, SnapshotError> {
        Self::from_file(path, super::file::open_regular(path)?, id, regions)
    }

    /// [`MemoryFile::open`] of a file already opened; `path` names it in errors.
    pub fn from_file(
        path: &Path,
        mut file: File,
        id: &str,
        regions: &[RegionState],
    ) -> Result<Self, SnapshotError> {
        let io = |what| SnapshotError::io(what, path);
        let mut h = vec![0u8; HEADER_LEN as usize];
        file.read_exact(&mut h)
            .map_err(|_| SnapshotError::invalid(path, "the memory file has no header"))?;
        let total: u64 = regions.iter().map(|r| r.size).sum();
        if h != header(id, total) {
            return Err(SnapshotError::invalid(
                path,
                "the memory file belongs to another snapshot or format",
            ));
        }
        let size = file.seek(SeekFrom::End(0)).map_err(io("reading"))?;
        let mut expected = HEADER_LEN;
        for r in regions {
            if r.file_offset != expected || r.size == 0 || r.size % PAGE as u64 != 0 {
                return Err(SnapshotError::invalid(path, "bad memory region layout"));
            }
            expected += r.size;
        }
        if size != expected {
            return Err(SnapshotError::invalid(
                path,
                format!("the memory file has {size} bytes, {expected} expected (truncated?)"),
            ));
        }
        Ok(MemoryFile {
            path: path.to_path_buf(),
            file,
            regions: regions.to_vec(),
        })
    }

    /// Maps every region copy-on-write: the guest's writes stay in this process.
    pub fn map(&self) -> Result<GuestMemory, SnapshotError> {
        let mut mapped = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            let file = self
                .file
                .try_clone()
                .map_err(SnapshotError::io("duplicating", &self.path))?;
            let region = MmapRegionBuilder::new(r.size as usize)
                .with_file_offset(FileOffset::new(file, r.file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|source| SnapshotError::MapMemory {
                    path: self.path.clone(),
                    source,
                })?;
            let region =
                GuestRegionMmap::new(region, GuestAddress(r.guest_addr)).ok_or_else(|| {
                    SnapshotError::RegionOverflow {
                        path: self.path.clone(),
                        guest_addr: r.guest_addr,
                        size: r.size,
                    }
                })?;
            mapped.push(region);
        }
        GuestMemory::from_regions(mapped).map_err(|source| SnapshotError::Regions {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("runvm-snapmem-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn memory_round_trips_sparsely_and_copy_on_write() {
        let dir = temp("rt");
        let mem = create_guest_memory(8 << 20).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(b"last page", GuestAddress((8 << 20) - 4096))
            .unwrap();
        let path = dir.join("memory");
        let regions = save(&mem, &path, "id-1").unwrap();
        assert_eq!(regions.len(), 1);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), HEADER_LEN + (8 << 20));
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "zero pages are holes: {} blocks",
            meta.blocks()
        );
        assert!(save(&mem, &path, "id-1").is_err(), "never overwrites");

        let file = MemoryFile::open(&path, "id-1", &regions).unwrap();
        let a = file.map().unwrap();
        let b = file.map().unwrap();
        let mut buf = [0u8; 10];
        a.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page");
        a.write_slice(b"changed!!!", GuestAddress(0)).unwrap();
        b.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page", "writes stay private");
        let mut tail = [0u8; 9];
        b.read_slice(&mut tail, GuestAddress((8 << 20) - 4096))
            .unwrap();
        assert_eq!(&tail, b"last page");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_of_another_snapshot_or_truncated_is_refused() {
        let dir = temp("bad");
        let mem = create_guest_memory(4 << 20).unwrap();
        let path = dir.join("memory");
        let regions = save(&mem, &path, "id-a").unwrap();
        let e = MemoryFile::open(&path, "id-b", &regions).unwrap_err();
        assert!(e.to_string().contains("another snapshot"), "{e}");
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEADER_LEN + (2 << 20)).unwrap();
        let e = MemoryFile::open(&path, "id-a", &regions).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        f.set_len(100).unwrap();
        let e = MemoryFile::open(&path, "id-a", &regions).unwrap_err();
        assert!(e.to_string().contains("no header"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
