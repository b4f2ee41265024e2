//! Running as a service: listening sockets handed over by systemd (socket activation:
//! `LISTEN_PID`, `LISTEN_FDS`), the readiness message (`NOTIFY_SOCKET`), and a pid file.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// More passed sockets than this is taken for a corrupt `LISTEN_FDS`.
const MAX_PASSED: usize = 1024;

/// A listening socket made outside the server (by systemd, or by a daemon embedding
/// [`Server`](crate::Server)) that it accepts connections on, besides
/// [`Config::tcp`](crate::Config::tcp) and [`Config::unix`](crate::Config::unix). A Unix
/// socket's file is its maker's: the server never removes it.
///
/// ```
/// use nbd_server::{Config, Listener};
/// let l = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let mut cfg = Config::new("disk.raw");
/// cfg.tcp = None;
/// cfg.listeners.push(Listener::from(l));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug)]
pub enum Listener {
    /// A TCP listener (IPv4 or IPv6).
    Tcp(Arc<std::net::TcpListener>),
    /// A Unix stream listener.
    Unix(Arc<std::os::unix::net::UnixListener>),
}

impl From<std::net::TcpListener> for Listener {
    fn from(l: std::net::TcpListener) -> Listener {
        Listener::Tcp(Arc::new(l))
    }
}

impl From<std::os::unix::net::UnixListener> for Listener {
    fn from(l: std::os::unix::net::UnixListener) -> Listener {
        Listener::Unix(Arc::new(l))
    }
}

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket's path (empty for an unnamed or abstract socket).
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp {a}"),
            Endpoint::Unix(p) => write!(f, "unix {}", p.display()),
        }
    }
}

impl Listener {
    /// Where it listens.
    ///
    /// # Errors
    /// `getsockname`'s.
    pub fn endpoint(&self) -> io::Result<Endpoint> {
        Ok(match self {
            Listener::Tcp(l) => Endpoint::Tcp(l.local_addr()?),
            Listener::Unix(l) => {
                let a = l.local_addr()?;
                Endpoint::Unix(a.as_pathname().map(Path::to_owned).unwrap_or_default())
            }
        })
    }
}

/// How many sockets the environment says were passed to process `pid`: `None` when it
/// passes none to this process (no `LISTEN_PID`, or another process's).
///
/// # Errors
/// `InvalidInput` for a `LISTEN_PID` or `LISTEN_FDS` that is not a number, or a
/// `LISTEN_FDS` without `LISTEN_PID`.
fn passed(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> io::Result<Option<usize>> {
    let bad = |what: &str, v: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket activation: {what}={v:?} is not a number (up to {MAX_PASSED} fds)"),
        )
    };
    let Some(p) = listen_pid else {
        if listen_fds.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket activation: LISTEN_FDS is set without LISTEN_PID",
            ));
        }
        return Ok(None);
    };
    if p.parse::<u32>().map_err(|_| bad("LISTEN_PID", p))? != pid {
        return Ok(None);
    }
    let Some(n) = listen_fds else {
        return Ok(None);
    };
    let n = n
        .parse::<usize>()
        .ok()
        .filter(|&n| n <= MAX_PASSED)
        .ok_or_else(|| bad("LISTEN_FDS", n))?;
    Ok((n > 0).then_some(n))
}

/// Whether the process has already taken its passed sockets.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening sockets systemd passed to this process (`LISTEN_PID` names it,
/// `LISTEN_FDS` counts them from fd 3), each checked to be a listening stream socket
/// (TCP or Unix) and marked close-on-exec. Empty when none were passed. Only the first
/// call takes them; later calls return nothing (each fd has one owner). The program must
/// not have given those fd numbers to anything else (the protocol reserves them); the
/// variables are left set (unsetting them is not safe once threads run), and a child
/// process is not named by `LISTEN_PID` anyway.
///
/// # Errors
/// `InvalidInput` for malformed variables, or a passed fd that is not open or not a
/// listening TCP or Unix stream socket.
pub fn listen_fds() -> io::Result<Vec<Listener>> {
    let env = |k| std::env::var(k).ok();
    let Some(n) = passed(
        env("LISTEN_PID").as_deref(),
        env("LISTEN_FDS").as_deref(),
        std::process::id(),
    )?
    else {
        return Ok(Vec::new());
    };
    // Relaxed: a one-shot claim; the winner takes the fds, a loser takes nothing, and no
    // other data is published through the flag.
    if TAKEN.swap(true, Ordering::Relaxed) {
        return Ok(Vec::new());
    }
    (0..n as RawFd)
        .map(|i| adopt(LISTEN_FDS_START + i))
        .collect()
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for getsockopt to write an int into.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Takes ownership of passed fd `fd` as a listener, once it is checked to be one; an fd that
/// is not is left as it is (it may be something else's).
fn adopt(fd: RawFd) -> io::Result<Listener> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let kind = sockopt(fd, libc::SO_TYPE);
    let listening = sockopt(fd, libc::SO_ACCEPTCONN);
    let domain = sockopt(fd, libc::SO_DOMAIN);
    let tcp = match (kind, listening, domain) {
        (Ok(libc::SOCK_STREAM), Ok(1), Ok(libc::AF_INET | libc::AF_INET6)) => true,
        (Ok(libc::SOCK_STREAM), Ok(1), Ok(libc::AF_UNIX)) => false,
        (Err(e), _, _) => return Err(invalid(format!("socket activation: passed fd {fd}: {e}"))),
        _ => {
            return Err(invalid(format!(
                "socket activation: passed fd {fd} is not a listening TCP or Unix stream socket"
            )));
        }
    };
    // SAFETY: fcntl on an open fd (getsockopt succeeded on it).
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        let e = io::Error::last_os_error();
        return Err(invalid(format!("socket activation: passed fd {fd}: {e}")));
    }
    // SAFETY: the fd is an open listening socket (above) that the socket activation protocol
    // passes to this process to own; `TAKEN` makes sure only one caller takes it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(if tcp {
        std::net::TcpListener::from(owned).into()
    } else {
        std::os::unix::net::UnixListener::from(owned).into()
    })
}

/// Tells systemd the service is ready (`READY=1` to `NOTIFY_SOCKET`, for `Type=notify`
/// units); does nothing when `NOTIFY_SOCKET` is not set.
///
/// # Errors
/// The socket's errors, or a `NOTIFY_SOCKET` that is not a Unix socket path (or an
/// abstract name starting with `@`).
pub fn notify_ready() -> io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let bytes = path.as_bytes();
    let addr = match bytes.first() {
        Some(b'@') => UnixAddr::from_abstract_name(&bytes[1..])?,
        Some(b'/') => UnixAddr::from_pathname(&path)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET={path:?} is neither a path nor an abstract name"),
            ));
        }
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(b"READY=1", &addr)?;
    Ok(())
}

/// A pid file: written (atomically, by a rename) once the server serves, removed when
/// dropped if it still holds this process's pid.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes this process's pid and a newline to `path`, replacing what was there (a
    /// stale file of a process that died).
    ///
    /// # Errors
    /// The file cannot be written in `path`'s directory.
    ///
    /// ```
    /// let path = std::env::temp_dir().join(format!("pid-doc-{}", std::process::id()));
    /// let pid = nbd_server::PidFile::write(&path)?;
    /// assert_eq!(std::fs::read_to_string(&path)?, format!("{}\n", std::process::id()));
    /// drop(pid);
    /// assert!(!path.exists());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn write(path: &Path) -> io::Result<PidFile> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        std::fs::write(&tmp, format!("{}\n", std::process::id())).map_err(context)?;
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(context(e));
        }
        Ok(PidFile {
            path: path.to_owned(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let mine = format!("{}\n", std::process::id());
        if std::fs::read_to_string(&self.path).is_ok_and(|s| s == mine) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_environment_names_the_process_and_the_count() {
        assert_eq!(passed(None, None, 7).unwrap(), None);
        assert_eq!(passed(Some("7"), Some("2"), 7).unwrap(), Some(2));
        assert_eq!(
            passed(Some("8"), Some("2"), 7).unwrap(),
            None,
            "another process's"
        );
        assert_eq!(passed(Some("7"), Some("0"), 7).unwrap(), None);
        assert_eq!(passed(Some("7"), None, 7).unwrap(), None);
        for (pid, fds) in [
            (Some("x"), Some("1")),
            (Some("7"), Some("-1")),
            (Some("7"), Some("99999999999")),
            (None, Some("1")),
        ] {
            let e = passed(pid, fds, 7).unwrap_err();
            assert_eq!(
                e.kind(),
                io::ErrorKind::InvalidInput,
                "{pid:?} {fds:?}: {e}"
            );
        }
    }

    #[test]
    fn only_listening_stream_sockets_are_adopted() {
        // A connected socket is refused and left open (it is not ours).
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = adopt(a.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not a listening"), "{e}");
        assert!(a.peer_addr().is_ok(), "still open");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let raw = OwnedFd::from(l);
        let n = raw.as_raw_fd();
        std::mem::forget(raw);
        let got = adopt(n).unwrap();
        assert_eq!(got.endpoint().unwrap(), Endpoint::Tcp(addr));
    }
}
