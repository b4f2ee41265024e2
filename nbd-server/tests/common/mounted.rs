//! The `nbd-server` binary serving a FUSE export (`--fuse`), for the tests that use the mounted
//! file with ordinary programs. Root only, as FUSE mounts are.

use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The server with its export mounted; on drop it is stopped (SIGTERM, then SIGKILL after
/// 10 s) and the mountpoint is unmounted if the server left it mounted.
pub struct Mounted {
    pub child: Child,
    pub mnt: PathBuf,
    /// The NBD URL, when `nbd` was asked for.
    pub url: Option<String>,
    /// The transport the server says it took.
    pub transport: String,
}

/// The transports a FUSE export runs on with `backend`.
pub fn transports(backend: &str) -> &'static [&'static str] {
    match backend {
        "uring" => &["uring", "classic"],
        _ => &["classic"],
    }
}

/// A scratch path in the target directory (on disk, not tmpfs).
pub fn scratch(tag: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuse-{tag}-{}", std::process::id()))
}

/// Starts the server on `img` with a FUSE export at a new mountpoint `<img>.mnt`, on
/// `backend` with `transport`, also listening for NBD (`nbd`), with `extra` arguments.
/// Panics, with the server's message, unless it mounts.
pub fn mount(backend: &str, transport: &str, img: &Path, nbd: bool, extra: &[&str]) -> Mounted {
    assert!(
        Path::new("/dev/fuse").exists(),
        "no /dev/fuse: the FUSE tests need the fuse module (and root)"
    );
    let mnt = img.with_extension("mnt");
    let _ = unmount(&mnt);
    std::fs::write(&mnt, b"").expect("create the mountpoint");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbd-server"));
    cmd.args(["--backend", backend, "--iothreads", "2", "--fuse"])
        .arg(&mnt)
        .args(["--fuse-transport", transport]);
    if nbd {
        cmd.args(["--bind", "127.0.0.1:0", "-x", "disk"]);
    }
    let mut child = cmd
        .args(extra)
        .arg(img)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(img.with_extension("log")).unwrap())
        .spawn()
        .expect("start nbd-server");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut url = None;
    let mut taken = None;
    for _ in 0..1 + nbd as usize {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            let _ = child.wait();
            let err = std::fs::read_to_string(img.with_extension("log")).unwrap_or_default();
            panic!("nbd-server did not mount ({backend}, {transport}): {err}");
        }
        if let Some(a) = line.trim().strip_prefix("nbd-server: listening on tcp ") {
            url = Some(format!("nbd://{a}/disk"));
        } else if let Some(rest) = line.trim().strip_prefix("nbd-server: fuse export on ") {
            let t = rest
                .rsplit_once(" (")
                .map(|(_, t)| t.trim_end_matches(" transport)"));
            taken = t.map(str::to_owned);
        } else {
            panic!("unexpected line from nbd-server: {line:?}");
        }
    }
    let transport_taken = taken.expect("the fuse export line");
    if transport != "auto" {
        assert_eq!(transport_taken, transport, "the transport asked for");
    }
    assert!(is_mounted(&mnt), "{} is mounted", mnt.display());
    Mounted {
        child,
        mnt,
        url,
        transport: transport_taken,
    }
}

impl Mounted {
    /// SIGTERM, and the exit status (within 10 s, or a panic).
    pub fn stop(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < until,
                "nbd-server did not stop within 10 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: as in `stop`.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = unmount(&self.mnt);
        let _ = std::fs::remove_file(&self.mnt);
    }
}

/// Whether something is mounted on `path` (from `/proc/self/mountinfo`, without touching
/// the mount).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(c) = std::fs::canonicalize(path.parent().unwrap()) else {
        return false;
    };
    let want = c.join(path.file_name().unwrap());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|p| p.as_bytes() == want.as_os_str().as_bytes())
    })
}

/// Lazily unmounts `path` if something is mounted there.
pub fn unmount(path: &Path) -> std::io::Result<()> {
    while is_mounted(path) {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
