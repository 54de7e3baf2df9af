//! Unix socket paths longer than `sun_path` allows (108 bytes). Docker and containerd put
//! state under long roots and 64-character ids, so `<root>/<id>/v.sock_1025` can pass the
//! limit. A [`SocketPath`] keeps such a path usable: it holds an `O_PATH` descriptor of
//! the socket's directory and names the socket `/proc/self/fd/<n>/<name>`, which is
//! short and resolves to the same file. The socket file itself stays where it was
//! asked to be, so removing the directory removes it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Longest path `bind`/`connect` take (the NUL terminator needs the last byte).
pub const MAX_SUN_PATH: usize = 107;
/// Longest suffix a [`SocketPath::sibling`] adds (`_` and a 32-bit port number).
const MAX_SIBLING_SUFFIX: usize = 11;

/// A socket path usable with `bind`/`connect` in this process, however long the real
/// path. Keep it alive as long as the path is used: it owns the directory descriptor.
#[derive(Debug)]
pub struct SocketPath {
    real: PathBuf,
    usable: PathBuf,
    _dir: Option<File>,
}

impl SocketPath {
    /// Prepares `path`; the directory must exist when the path is too long (for itself
    /// or for its siblings).
    pub fn new(path: &Path) -> std::io::Result<Self> {
        if path.as_os_str().as_bytes().len() + MAX_SIBLING_SUFFIX <= MAX_SUN_PATH {
            return Ok(SocketPath {
                real: path.to_path_buf(),
                usable: path.to_path_buf(),
                _dir: None,
            });
        }
        let (dir, name) = match (path.parent(), path.file_name()) {
            (Some(d), Some(n)) => (d, n),
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("socket path {} has no file name", path.display()),
                ))
            }
        };
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)?;
        let usable = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
        if usable.as_os_str().as_bytes().len() + MAX_SIBLING_SUFFIX > MAX_SUN_PATH {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("socket name in {} is too long", path.display()),
            ));
        }
        Ok(SocketPath {
            real: path.to_path_buf(),
            usable,
            _dir: Some(dir),
        })
    }

    /// The path to give `bind`/`connect` in this process.
    pub fn usable(&self) -> &Path {
        &self.usable
    }

    /// The socket's real path (for messages and removal).
    pub fn real(&self) -> &Path {
        &self.real
    }

    /// The socket `<path>_<suffix>` next to this one, made usable the same way.
    pub fn sibling(&self, suffix: &str) -> PathBuf {
        let mut s = self.usable.as_os_str().to_os_string();
        s.push(suffix);
        PathBuf::from(s)
    }
}

/// `UnixStream::connect` for a path of any length.
pub fn connect(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    std::os::unix::net::UnixStream::connect(SocketPath::new(path)?.usable())
}

/// `UnixListener::bind` for a path of any length; the socket file is at `path`, mode
/// 0600 whatever the umask (connecting needs write permission on it).
pub fn bind(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    SocketPath::new(path)?.bind()
}

impl SocketPath {
    /// Binds a listener here and makes the socket file 0600.
    pub fn bind(&self) -> std::io::Result<std::os::unix::net::UnixListener> {
        let l = std::os::unix::net::UnixListener::bind(self.usable())?;
        std::fs::set_permissions(self.usable(), std::fs::Permissions::from_mode(0o600))?;
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn short_paths_pass_through() {
        let p = SocketPath::new(Path::new("/run/x.sock")).unwrap();
        assert_eq!(p.usable(), Path::new("/run/x.sock"));
        assert_eq!(p.sibling("_5"), PathBuf::from("/run/x.sock_5"));
    }

    #[test]
    fn long_paths_bind_and_connect_in_place() {
        let base = std::env::temp_dir().join(format!("runvm-sockpath-{}", std::process::id()));
        let dir = base.join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&dir).unwrap();
        let real = dir.join("v.sock");
        assert!(real.as_os_str().len() > MAX_SUN_PATH);
        assert!(
            UnixListener::bind(&real).is_err(),
            "the kernel limit still applies"
        );
        let p = SocketPath::new(&real).unwrap();
        let l = UnixListener::bind(p.usable()).unwrap();
        assert!(real.exists(), "the socket file is at its real path");
        let mut c = connect(&real).unwrap();
        c.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        l.accept().unwrap().0.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        let s = UnixListener::bind(p.sibling("_1025")).unwrap();
        assert!(dir.join("v.sock_1025").exists());
        let b = bind(&dir.join("b.sock")).unwrap();
        let mode = std::fs::metadata(dir.join("b.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "a bound socket is private");
        assert!(dir.join("b.sock").exists());
        drop((l, s, b));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_path_that_fits_but_whose_siblings_do_not_is_reached_through_its_directory() {
        let base = std::env::temp_dir().join(format!("runvm-sibling-{}", std::process::id()));
        let mut dir = base.clone();
        let name = "v.sock";
        let fill = MAX_SUN_PATH - 3 - base.as_os_str().len() - 1 - name.len();
        dir.push("s".repeat(fill));
        std::fs::create_dir_all(&dir).unwrap();
        let real = dir.join(name);
        assert!(real.as_os_str().len() <= MAX_SUN_PATH);
        let p = SocketPath::new(&real).unwrap();
        let sibling = p.sibling("_4294967295");
        assert!(
            sibling.as_os_str().len() <= MAX_SUN_PATH,
            "{}",
            sibling.display()
        );
        let l = UnixListener::bind(&sibling).unwrap();
        assert!(dir.join("v.sock_4294967295").exists());
        drop(l);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
