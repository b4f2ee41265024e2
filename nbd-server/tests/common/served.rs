//! The `nbd-server` binary as a child process, for the tests that drive it with other
//! programs (QEMU's tools, libnbd's).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The server binary, killed (SIGKILL) on drop unless it was stopped before.
pub struct Served {
    pub child: Child,
    pub url: String,
    pub unix_url: Option<String>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn scratch(tag: &str, backend: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("interop-{tag}-{backend}-{}", std::process::id()))
}

pub fn serve(backend: &str, file: &Path, extra: &[&str]) -> Served {
    serve_logging(backend, file, extra, Stdio::inherit())
}

/// [`serve`], with the server's log (stderr) going to `log`.
pub fn serve_logging(backend: &str, file: &Path, extra: &[&str], log: Stdio) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
        .args(["--backend", backend, "--bind", "127.0.0.1:0", "-x", "disk"])
        .args(extra)
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start nbd-server");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut url = None;
    let mut unix_url = None;
    let want = 1 + extra.contains(&"--socket") as usize;
    for _ in 0..want {
        let mut line = String::new();
        out.read_line(&mut line)
            .expect("nbd-server's listening line");
        if let Some(a) = line.trim().strip_prefix("nbd-server: listening on tcp ") {
            url = Some(format!("nbd://{a}/disk"));
        } else if let Some(p) = line.trim().strip_prefix("nbd-server: listening on unix ") {
            unix_url = Some(format!("nbd+unix:///disk?socket={p}"));
        } else {
            panic!("unexpected line from nbd-server: {line:?}");
        }
    }
    Served {
        child,
        url: url.expect("a TCP listener"),
        unix_url,
    }
}

/// The address in nbd-server's "listening on tcp" line; panics on any other line.
pub fn tcp_address(line: &str) -> std::net::SocketAddr {
    line.trim()
        .strip_prefix("nbd-server: listening on tcp ")
        .unwrap_or_else(|| panic!("unexpected line from nbd-server: {line:?}"))
        .parse()
        .expect("an address after \"listening on tcp\"")
}

/// Runs a QEMU tool; panics with its output unless it succeeds. Returns stdout.
pub fn qemu(tool: &str, args: &[&str]) -> String {
    run(tool, args)
}

/// Runs `tool` (a QEMU or libnbd program, or Python); panics with its output unless it succeeds, and
/// says which package brings it when it is missing. Returns stdout.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        let package = if tool.starts_with("qemu") {
            "qemu-utils"
        } else if tool.contains("python") {
            "python3-libnbd"
        } else {
            "libnbd-bin"
        };
        panic!("cannot run {tool} ({e}): install it (apt-get install {package}; .ci/run does)")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A small random generator (xorshift), seeded.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Makes `cmd`'s child get `fds` as fds 3, 4, ... (open across the exec), the way systemd
/// passes listening sockets. Any fd numbers work, 3 and 4 included.
pub fn pass_fds(cmd: &mut Command, fds: &[std::os::fd::RawFd]) {
    use std::os::unix::process::CommandExt;
    assert!(fds.len() <= 8);
    let mut from = [-1; 8];
    from[..fds.len()].copy_from_slice(fds);
    let n = fds.len();
    // SAFETY: only fcntl and dup2 in the child, both async-signal-safe, on fds open in the
    // parent (so in the child).
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way (copies at 64 and up), then into place: a source that is
            // already 3 or 4 is neither overwritten nor left close-on-exec.
            let mut tmp = [-1; 8];
            for i in 0..n {
                tmp[i] = libc::fcntl(from[i], libc::F_DUPFD_CLOEXEC, 64);
                if tmp[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &t) in tmp.iter().enumerate().take(n) {
                if libc::dup2(t, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}
