//! The state file of a snapshot and loading a whole snapshot.
//!
//! Layout: a magic line, a header line (JSON: format version, payload length, payload
//! SHA-256), then the payload: the [`VmState`] as JSON. Loading checks all three and the
//! shape before anything is parsed further or mapped, so a truncated, corrupted,
//! mismatched or foreign file is refused as a whole and nothing is half-restored.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::memory::{self, MemoryFile};
use super::{Shape, SnapshotError, VmState, FORMAT_VERSION, MEMORY_FILE, STATE_FILE};
use crate::memory::GuestMemory;

const MAGIC: &str = "runvm-vm-state";
/// Largest state file accepted (a VM's state is tens of KiB per vCPU).
const MAX_STATE_LEN: u64 = 16 << 20;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Header {
    format: u32,
    length: u64,
    sha256: String,
}

fn hex_digest(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes the snapshot of a VM into `dir` (which exists and holds no snapshot): the
/// memory file first, then the state file that refers to it. `state.regions` and
/// `state.memory_id` are filled here. A failure (a full disk, say) removes what was
/// written.
pub fn save(dir: &Path, state: VmState, mem: &GuestMemory) -> Result<(), SnapshotError> {
    let result = write_files(dir, state, mem);
    if result.is_err() {
        for name in [STATE_FILE, MEMORY_FILE] {
            let _ = std::fs::remove_file(dir.join(name));
        }
    }
    result
}

fn write_files(dir: &Path, mut state: VmState, mem: &GuestMemory) -> Result<(), SnapshotError> {
    state.memory_id = super::random_id().map_err(SnapshotError::io("randomness for", dir))?;
    state.regions = memory::save(mem, &dir.join(MEMORY_FILE), &state.memory_id)?;
    let path = dir.join(STATE_FILE);
    let payload = serde_json::to_vec(&state).map_err(SnapshotError::Encode)?;
    let header = Header {
        format: FORMAT_VERSION,
        length: payload.len() as u64,
        sha256: hex_digest(&payload),
    };
    let header = serde_json::to_string(&header).map_err(SnapshotError::Encode)?;
    let io = |what| SnapshotError::io(what, &path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io("creating"))?;
    f.write_all(format!("{MAGIC}\n{header}\n").as_bytes())
        .and_then(|()| f.write_all(&payload))
        .and_then(|()| f.sync_all())
        .map_err(io("writing"))
}

/// A checked snapshot, ready to be restored.
#[derive(Debug)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub state: VmState,
    pub memory: MemoryFile,
}

/// Loads the snapshot in `dir` for a VM of shape `wanted`: the state file whole and
/// intact, of this format and this shape, and the memory file that belongs to it.
pub fn load(dir: &Path, wanted: &Shape) -> Result<Snapshot, SnapshotError> {
    let state = open_regular(&dir.join(STATE_FILE))?;
    let memory = open_regular(&dir.join(MEMORY_FILE))?;
    load_files(dir, state, memory, wanted)
}

/// [`load`] from the two files, already opened (by a caller that checked who owns them);
/// `dir` names the snapshot in errors.
pub fn load_files(
    dir: &Path,
    state: File,
    memory: File,
    wanted: &Shape,
) -> Result<Snapshot, SnapshotError> {
    let state = read_state_from(&dir.join(STATE_FILE), state)?;
    if &state.shape != wanted {
        return Err(SnapshotError::ShapeMismatch {
            path: dir.to_path_buf(),
            differs: state.shape.differences(wanted).join(", "),
        });
    }
    let memory = MemoryFile::from_file(
        &dir.join(MEMORY_FILE),
        memory,
        &state.memory_id,
        &state.regions,
    )?;
    Ok(Snapshot {
        dir: dir.to_path_buf(),
        state,
        memory,
    })
}

/// Opens a snapshot file for reading: never through a symbolic link, never blocking (on a
/// FIFO), and only a regular file.
pub fn open_regular(path: &Path) -> Result<File, SnapshotError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(SnapshotError::io("opening", path))?;
    let meta = f.metadata().map_err(SnapshotError::io("reading", path))?;
    if !meta.is_file() {
        return Err(SnapshotError::invalid(path, "not a regular file"));
    }
    Ok(f)
}

/// Reads and checks a state file.
pub fn read_state(path: &Path) -> Result<VmState, SnapshotError> {
    read_state_from(path, open_regular(path)?)
}

fn read_state_from(path: &Path, f: File) -> Result<VmState, SnapshotError> {
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_STATE_LEN + 1), &mut data)
        .map_err(SnapshotError::io("reading", path))?;
    if data.len() as u64 > MAX_STATE_LEN {
        return Err(SnapshotError::invalid(path, "the state file is too large"));
    }
    let bad = |reason: &str| SnapshotError::invalid(path, reason);
    let mut parts = data.splitn(3, |&b| b == b'\n');
    if parts.next() != Some(MAGIC.as_bytes()) {
        return Err(bad("not a runvm state file"));
    }
    let header: Header = parts
        .next()
        .and_then(|h| serde_json::from_slice(h).ok())
        .ok_or_else(|| bad("its header is unreadable"))?;
    if header.format != FORMAT_VERSION {
        return Err(SnapshotError::invalid(
            path,
            format!(
                "format {} (this runvm reads {FORMAT_VERSION})",
                header.format
            ),
        ));
    }
    let payload = parts.next().unwrap_or_default();
    if payload.len() as u64 != header.length {
        return Err(SnapshotError::invalid(
            path,
            format!(
                "{} bytes of state, {} expected (truncated?)",
                payload.len(),
                header.length
            ),
        ));
    }
    if hex_digest(payload) != header.sha256 {
        return Err(bad("its checksum does not match (corrupted)"));
    }
    serde_json::from_slice(payload).map_err(|e| SnapshotError::invalid(path, e.to_string()))
}
