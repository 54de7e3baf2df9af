//! Writes initramfs images: uncompressed cpio archives in the "newc" format the kernel
//! unpacks into its root file system before running `/init`.

use std::io::{self, Write};
use std::path::Path;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    name: String,
    mode: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

/// An initramfs under construction. Paths are relative to the root (no leading `/`).
#[derive(Clone, Debug, Default)]
pub struct Initramfs {
    entries: Vec<Entry>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: Vec<u8>) -> &mut Self {
        self.entries.push(Entry {
            name: name.trim_start_matches('/').to_string(),
            mode,
            rdev,
            data,
        });
        self
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> &mut Self {
        self.push(name, S_IFDIR | (perm & 0o7777), (0, 0), Vec::new())
    }

    /// Adds a regular file with `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: impl Into<Vec<u8>>) -> &mut Self {
        self.push(name, S_IFREG | (perm & 0o7777), (0, 0), data.into())
    }

    /// Adds a regular file copied from the host.
    pub fn file_from(&mut self, name: &str, perm: u32, host: &Path) -> io::Result<&mut Self> {
        let data = std::fs::read(host)?;
        Ok(self.file(name, perm, data))
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.push(name, S_IFLNK | 0o777, (0, 0), target.as_bytes().to_vec())
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.push(name, S_IFCHR | (perm & 0o7777), (major, minor), Vec::new())
    }

    /// Adds the directories and device nodes every init expects: `/dev/console` gives
    /// `/init` its standard streams.
    pub fn base_layout(&mut self) -> &mut Self {
        for d in ["dev", "proc", "sys", "run", "tmp", "etc"] {
            self.dir(d, 0o755);
        }
        self.char_dev("dev/console", 0o600, 5, 1)
            .char_dev("dev/null", 0o666, 1, 3)
    }

    /// Writes the archive.
    pub fn write_to(&self, mut w: impl Write) -> io::Result<()> {
        let mut offset = 0usize;
        for (i, e) in self.entries.iter().enumerate() {
            offset += write_entry(&mut w, i as u32 + 1, e, offset)?;
        }
        let trailer = Entry {
            name: "TRAILER!!!".into(),
            mode: 0,
            rdev: (0, 0),
            data: Vec::new(),
        };
        offset += write_entry(&mut w, 0, &trailer, offset)?;
        // Pad the archive to a 512-byte multiple, as cpio does.
        let pad = (512 - offset % 512) % 512;
        w.write_all(&vec![0; pad])?;
        w.flush()
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v).expect("writing to a Vec cannot fail");
        v
    }
}

/// Errors writing the agent initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("reading agent {path}: {source}")]
    Agent {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Writes the initramfs that boots the agent: the base layout and the agent as `/init`.
/// The file appears atomically (temp file + rename).
pub fn write_agent_initramfs(agent: &Path, output: &Path) -> Result<(), InitramfsError> {
    let mut image = Initramfs::new();
    image
        .base_layout()
        .file_from("init", 0o755, agent)
        .map_err(|source| InitramfsError::Agent {
            path: agent.to_path_buf(),
            source,
        })?;
    let tmp = output.with_extension("tmp");
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InitramfsError::Write { path, source }
    };
    std::fs::write(&tmp, image.to_bytes()).map_err(write_err(&tmp))?;
    std::fs::rename(&tmp, output).map_err(write_err(output))
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

fn write_entry(w: &mut impl Write, ino: u32, e: &Entry, offset: usize) -> io::Result<usize> {
    let nlink = if e.mode & S_IFDIR != 0 { 2 } else { 1 };
    let header = format!(
        "070701{ino:08x}{:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        e.mode,
        0, // uid
        0, // gid
        0, // mtime
        e.data.len(),
        0, // dev major
        0, // dev minor
        e.rdev.0,
        e.rdev.1,
        e.name.len() + 1,
        0, // check
    );
    debug_assert_eq!(header.len(), 110);
    let mut written = 0;
    w.write_all(header.as_bytes())?;
    w.write_all(e.name.as_bytes())?;
    w.write_all(&[0])?;
    written += 110 + e.name.len() + 1;
    let p = pad4(offset + written);
    w.write_all(&[0; 3][..p])?;
    written += p;
    w.write_all(&e.data)?;
    written += e.data.len();
    let p = pad4(offset + written);
    w.write_all(&[0; 3][..p])?;
    Ok(written + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut i = Initramfs::new();
        i.base_layout()
            .file("init", 0o755, b"abc".to_vec())
            .symlink("sbin", "bin");
        let b = i.to_bytes();
        assert_eq!(b.len() % 512, 0);
        assert!(b.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("TRAILER!!!"));
        // Each header starts on a 4-byte boundary.
        let mut pos = 0;
        let mut names = Vec::new();
        loop {
            assert_eq!(pos % 4, 0);
            assert_eq!(&b[pos..pos + 6], b"070701");
            let field = |k: usize| {
                usize::from_str_radix(
                    std::str::from_utf8(&b[pos + 6 + k * 8..pos + 14 + k * 8]).unwrap(),
                    16,
                )
                .unwrap()
            };
            let size = field(6);
            let namesize = field(11);
            let name = std::str::from_utf8(&b[pos + 110..pos + 110 + namesize - 1])
                .unwrap()
                .to_string();
            let data_start = pos + 110 + namesize + pad4(pos + 110 + namesize);
            if name == "init" {
                assert_eq!(&b[data_start..data_start + size], b"abc");
                assert_eq!(field(1), 0o100755);
            }
            if name == "dev/console" {
                assert_eq!((field(9), field(10)), (5, 1));
            }
            names.push(name.clone());
            if name == "TRAILER!!!" {
                break;
            }
            pos = data_start + size + pad4(data_start + size);
        }
        assert!(names.contains(&"sbin".to_string()));
        assert_eq!(names.len(), 11);
    }

    #[test]
    fn cpio_tool_can_list_it() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: cpio(1) is not installed");
            return;
        }
        let mut i = Initramfs::new();
        i.dir("etc", 0o755)
            .file("etc/hello", 0o644, b"hello\n".to_vec());
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&i.to_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "etc\netc/hello\n");
    }
}
