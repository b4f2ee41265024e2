//! The `nbd-server` binary as a child process watched from outside: its memory (RSS), CPU
//! time, log (stderr, in a file) and the load it prints on `SIGUSR1`. For the tests of hostile
//! clients and bursts of connections.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use super::Client;
use tests::Reactor;

/// The server binary with its stderr in a file; SIGKILLed on drop.
pub struct Watched {
    pub child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Watched {
    /// Starts the server on `r`'s backend, with `extra` arguments, serving `file`; with an
    /// fd limit of `nofile` if given.
    pub fn start(
        r: &Reactor,
        tag: &str,
        file: &Path,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Watched {
        let log = scratch(&format!("{tag}-{}.log", r.backend()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbd-server"));
        cmd.args([
            "--backend",
            &r.backend().to_string(),
            "--bind",
            "127.0.0.1:0",
        ])
        .args(extra)
        .arg(file)
        .env("NBD_SERVER_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("start nbd-server");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("nbd-server's listening line");
        let addr = super::served::tcp_address(&line);
        Watched {
            child,
            addr,
            log,
            stdout,
        }
    }

    fn status(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/PID/status"))
    }

    /// Resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        self.status("VmRSS:") * 1024
    }

    /// CPU time used so far (user + system).
    pub fn cpu(&self) -> Duration {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_nanos(ticks * 1_000_000_000 / hz)
    }

    /// CPU time once the server has gone quiet (no CPU used for 300 ms), at most `limit`.
    pub fn cpu_when_quiet(&self, limit: Duration) -> Duration {
        let t0 = Instant::now();
        let mut last = self.cpu();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.cpu();
            if now == last || t0.elapsed() > limit {
                return now;
            }
            last = now;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// A connection through `NBD_OPT_GO` for the default export.
    pub fn session(&self) -> Client {
        let mut c = Client::connect(self.addr);
        c.go("");
        c
    }

    /// The load the server prints on `SIGUSR1` (the line after "nbd-server: load: ").
    pub fn load(&mut self) -> String {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(pid, libc::SIGUSR1) };
        assert_eq!(rc, 0);
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("nbd-server's load line");
        line.trim()
            .strip_prefix("nbd-server: load: ")
            .unwrap_or_else(|| panic!("unexpected line from nbd-server: {line:?}"))
            .to_owned()
    }

    /// Polls the load until it is `want`, for at most `limit`; the last one seen.
    pub fn load_until(&mut self, want: &str, limit: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let load = self.load();
            if load == want || t0.elapsed() > limit {
                return load;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A path in the target's scratch directory, unique to this test process.
pub fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("watched-{name}-{}", std::process::id()))
}

/// A sparse file of `size` bytes (reads of it still cost the server its buffers).
pub fn sparse(name: &str, size: u64) -> PathBuf {
    let p = scratch(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}
