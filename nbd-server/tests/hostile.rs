//! The `nbd-server` binary against hostile clients, on both backends, measured from outside
//! its process: memory (RSS) under clients that never read their replies and after they
//! leave, CPU spent for a client that sends work and resets, log bytes per attack, log lines
//! while `accept` fails with `EMFILE`. (The reactor each test gets from `backend_tests!` only
//! names the backend the binary is told to use.)

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tests::{Reactor, backend_tests};

/// The server binary with its stderr in a file; SIGKILLed on drop.
struct Served {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Served {
    fn start(r: &Reactor, tag: &str, file: &Path, extra: &[&str], nofile: Option<u64>) -> Served {
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
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("nbd-server's listening line");
        let addr = served::tcp_address(&line);
        Served { child, addr, log }
    }

    fn status(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/PID/status"))
    }

    /// Resident memory, in bytes.
    fn rss(&self) -> u64 {
        self.status("VmRSS:") * 1024
    }

    /// CPU time used so far (user + system).
    fn cpu(&self) -> Duration {
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
    fn cpu_when_quiet(&self, limit: Duration) -> Duration {
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

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    fn session(&self) -> Client {
        let mut c = Client::connect(self.addr);
        c.go("");
        c
    }
}

fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hostile-{name}-{}", std::process::id()))
}

/// A sparse file of `size` bytes (reads of it still cost the server its buffers).
fn sparse(name: &str, size: u64) -> PathBuf {
    let p = scratch(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// READ requests, encoded back to back.
fn reads(n: u64, len: u32) -> Vec<u8> {
    (0..n)
        .flat_map(|h| {
            proto::Request {
                flags: 0,
                kind: cmd::READ,
                handle: h,
                offset: 0,
                length: len.into(),
            }
            .encode()
        })
        .collect()
}

const MB: u64 = 1 << 20;

backend_tests! {
    fn memory_stays_bounded_and_returns_after_clients_that_never_read(r: &Reactor) {
        let file = sparse(&format!("mem-{}", r.backend()), 32 * MB);
        let srv = Served::start(r, "mem", &file, &[], None);
        // The server at work once, then its baseline.
        let mut c = srv.session();
        assert_eq!(c.read(1, 0, 4096).0, 0);
        drop(c);
        std::thread::sleep(Duration::from_millis(200));
        let base = srv.rss();
        // 48 connections, each with eight 21 MiB READs it never reads the replies of.
        let clients: Vec<Client> = (0..48)
            .map(|_| {
                let mut c = srv.session();
                c.send(&reads(8, 21 << 20));
                c
            })
            .collect();
        let mut peak = 0;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            peak = peak.max(srv.rss());
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{}: RSS base {} MB, peak {} MB", r.backend(), base / MB, peak / MB);
        assert!(peak > base + 256 * MB, "the attack did not load the server: {peak}");
        assert!(peak < 1200 * MB, "RSS {} MB under the attack", peak / MB);
        drop(clients);
        // Back to (near) the baseline once they are gone.
        let t0 = Instant::now();
        let idle = loop {
            std::thread::sleep(Duration::from_millis(200));
            let rss = srv.rss();
            if rss < base + 64 * MB || t0.elapsed() > Duration::from_secs(20) {
                break rss;
            }
        };
        eprintln!("{}: RSS at idle after {} MB", r.backend(), idle / MB);
        assert!(
            idle < base + 64 * MB,
            "RSS {} MB at idle after the clients left, {} MB before",
            idle / MB,
            base / MB
        );
        // And it still serves.
        let mut c = srv.session();
        assert_eq!(c.read(2, 0, 4096).0, 0);
        drop(srv);
        std::fs::remove_file(file).unwrap();
    }

    fn a_client_that_queues_work_and_resets_costs_little_cpu(r: &Reactor) {
        let file = sparse(&format!("reset-{}", r.backend()), 32 * MB);
        let srv = Served::start(r, "reset", &file, &[], None);
        let mut c = srv.session();
        assert_eq!(c.read(1, 0, 4096).0, 0);
        let before = srv.cpu_when_quiet(Duration::from_secs(5));
        // 2,000 READs of 32 MiB (56 KB of requests), then a reset.
        c.send(&reads(2000, 32 << 20));
        let sock = socket2_linger_zero(&c.s);
        drop(c);
        drop(sock);
        let after = srv.cpu_when_quiet(Duration::from_secs(30));
        let spent = after - before;
        eprintln!("{}: {spent:?} of server CPU for the reset client", r.backend());
        assert!(spent < Duration::from_secs(1), "{spent:?} of server CPU for a client that reset");
        // Others are served.
        let mut c = srv.session();
        assert_eq!(c.read(2, 0, 4096).0, 0);
        drop(srv);
        std::fs::remove_file(file).unwrap();
    }

    fn a_long_unknown_export_name_adds_little_to_the_log(r: &Reactor) {
        let file = sparse(&format!("log-{}", r.backend()), MB);
        let srv = Served::start(r, "log", &file, &["-x", "disk"], None);
        let before = srv.log_text().len();
        let mut c = Client::connect(srv.addr);
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
        c.option(opt::EXPORT_NAME, &[0xffu8; 65536]);
        assert!(c.closed_by_server());
        std::thread::sleep(Duration::from_millis(200));
        let log = srv.log_text();
        let added = log.len() - before;
        eprintln!("{}: {added} log bytes for a 64 KiB export name", r.backend());
        assert!(added > 0, "the refusal is logged");
        assert!(added < 1024, "{added} bytes logged: {log}");
        assert!(log.contains("65536 bytes"), "{log}");
    }

    fn accept_failing_with_emfile_logs_little_and_resumes_when_fds_free(r: &Reactor) {
        let file = sparse(&format!("emfile-{}", r.backend()), MB);
        // A low fd limit, and no connection limit below it: accept meets EMFILE.
        let srv = Served::start(r, "emfile", &file, &["--max-connections", "1000"], Some(48));
        let mut served = Vec::new();
        let pending = loop {
            let mut c = Client::connect(srv.addr);
            c.s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let mut greeting = [0u8; 18];
            match std::io::Read::read_exact(&mut c.s, &mut greeting) {
                Ok(()) => served.push(c),
                // Connected (the kernel's backlog), never accepted: EMFILE.
                Err(_) => break c,
            }
            assert!(served.len() < 48, "accept never failed");
        };
        // EMFILE for 3 s more.
        std::thread::sleep(Duration::from_secs(3));
        let lines = srv.log_text().lines().filter(|l| l.contains("accept")).count();
        eprintln!("{}: {lines} accept log lines in 3+ s of EMFILE", r.backend());
        assert!((1..=3).contains(&lines), "{lines} accept lines:\n{}", srv.log_text());
        // One client leaves: the pending one is accepted soon after, not at the end of a
        // long pause.
        drop(served.pop());
        let mut pending = pending;
        pending.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t0 = Instant::now();
        let mut greeting = [0u8; 18];
        std::io::Read::read_exact(&mut pending.s, &mut greeting).expect("accepted once an fd freed");
        eprintln!("{}: accepted {:?} after an fd freed", r.backend(), t0.elapsed());
        assert!(t0.elapsed() < Duration::from_millis(900), "{:?}", t0.elapsed());
        drop(served);
    }
}

/// Makes the close of `s` send a reset (SO_LINGER with a zero timeout); returns a clone that
/// must be dropped too.
fn socket2_linger_zero(s: &TcpStream) -> TcpStream {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid linger struct for a live socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let _ = (&*s).flush();
    s.try_clone().unwrap()
}
