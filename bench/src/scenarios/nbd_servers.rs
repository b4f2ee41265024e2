//! The NBD servers the `nbd*` scenarios measure, as child processes exporting one file over
//! loopback TCP: this repository's `nbd-server` on each backend (the bench binary itself,
//! `bench --nbd-server ARGS`, so the figures are the program's), `qemu-storage-daemon` with
//! an iothread, `qemu-nbd`, and `nbdkit`'s file plugin. Each dies with the bench
//! (`PR_SET_PDEATHSIG`), and its CPU time is read from its process CPU clock.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::qemu;
use crate::measure::Cpu;

/// The exported file's size for the request/response rows: qemu-img bench's sequential
/// offsets wrap at its end.
pub const FILE_SIZE: u64 = 64 << 20;

/// Extra options for the reactor servers (`nbd-server --help`), split at whitespace.
pub const EXTRA_ARGS_ENV: &str = "BENCH_NBD_SERVER_ARGS";

/// The hidden argument that turns the bench binary into `nbd-server`.
pub const SERVE_ARG: &str = "--nbd-server";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Reactor(&'static str),
    /// `nbd-server` on io_uring without busy polling (`--poll-max-ns 0`): what its default
    /// polling (while the client's queue is shallow) changes.
    ReactorNoPoll,
    StorageDaemon,
    QemuNbd,
    Nbdkit,
}

/// Every server measured, in the order of the rows.
pub const SERVERS: [Server; 5] = [
    Server::Reactor("uring"),
    Server::Reactor("epoll"),
    Server::StorageDaemon,
    Server::QemuNbd,
    Server::Nbdkit,
];

impl Server {
    pub fn system(self) -> String {
        match self {
            Server::Reactor(b) => format!("reactor-{b}"),
            Server::ReactorNoPoll => "reactor-uring-nopoll".into(),
            Server::StorageDaemon => "qemu-storage-daemon".into(),
            Server::QemuNbd => "qemu-nbd".into(),
            Server::Nbdkit => "nbdkit".into(),
        }
    }
}

/// How a server is set up beyond the defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Setup {
    /// Through the page cache, plaintext.
    #[default]
    Plain,
    /// Around the page cache (`O_DIRECT` where the server has it; the `nbd-direct`
    /// scenario's description names each server's setting).
    Direct,
    /// TLS required, with the `psktool` file `DIR/keys.psk` (user `alice`).
    TlsPsk(PathBuf),
    /// TLS required, with the certificates of `DIR/server` (see [`super::nbd_tls::tls_creds`]).
    TlsX509(PathBuf),
}

/// A running server process, killed on drop.
pub struct Running {
    child: Child,
    pub addr: SocketAddr,
    /// The libnbd URI of its export (`nbds://` with the credentials' files under TLS).
    pub url: String,
    /// Environment a client needs (TLS x509: `HOME` with `.pki/libnbd/ca-cert.pem`, for
    /// clients such as fio's engine that cannot pass files in the URI).
    pub client_env: Vec<(String, String)>,
    proc_cpu: ProcCpu,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// CPU time the server process has used (see [`ProcCpu::cpu`]).
    pub fn cpu(&self) -> Cpu {
        self.proc_cpu.cpu()
    }

    /// How the server process's CPU time is read.
    pub fn proc_cpu(&self) -> &ProcCpu {
        &self.proc_cpu
    }
}

/// A child process's CPU time, all its threads (ended ones included).
pub struct ProcCpu {
    pid: u32,
    clock: libc::clockid_t,
}

impl ProcCpu {
    /// The CPU clock of `child` (alive).
    pub fn of(child: &Child) -> ProcCpu {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `clock` is a valid out-pointer; the pid is our live child.
        let rc = unsafe { libc::clock_getcpuclockid(child.id() as libc::pid_t, &mut clock) };
        assert_eq!(rc, 0, "no CPU clock for the server process");
        ProcCpu {
            pid: child.id(),
            clock,
        }
    }

    /// CPU time used so far: exact from the process's CPU clock, split by the user and
    /// system times of `/proc/PID/stat`.
    pub fn cpu(&self) -> Cpu {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .expect("read the server's /proc/PID/stat");
        // The fields after the command name, which ends at the last ')': state is the 3rd
        // field of the line, utime the 14th and stime the 15th.
        let fields: Vec<&str> = stat[stat.rfind(')').expect("a stat line") + 1..]
            .split_whitespace()
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let ticks = |i: usize| -> u64 { fields[i].parse().expect("a tick count") };
        Cpu {
            ns: self.cpu_ns(),
            user_ns: ticks(14 - 3) * 1_000_000_000 / hz,
            system_ns: ticks(15 - 3) * 1_000_000_000 / hz,
        }
    }

    /// CPU time used so far, in ns.
    fn cpu_ns(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write; the clock id names a live child.
        let rc = unsafe { libc::clock_gettime(self.clock, &mut ts) };
        assert_eq!(rc, 0, "reading the server's CPU clock failed");
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Starts `server` exporting `file` as `disk` on a free loopback port; returns once it
/// accepts connections.
pub fn start(server: Server, file: &Path) -> Running {
    start_on(server, file, None)
}

/// [`start`], with every thread of the server on CPU `cpu` only when given.
pub fn start_on(server: Server, file: &Path, cpu: Option<usize>) -> Running {
    start_setup(server, file, cpu, &Setup::Plain)
}

/// The options that set `server` up as `setup` says: `(server options, export/plugin
/// options)` for the command lines below.
fn setup_args(server: Server, setup: &Setup) -> Vec<String> {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let dir = |d: &Path| d.to_str().expect("a UTF-8 path").to_string();
    match (server, setup) {
        (_, Setup::Plain) => Vec::new(),
        (Server::Reactor(_) | Server::ReactorNoPoll, Setup::Direct) => s(&["--cache", "none"]),
        (Server::Reactor(_) | Server::ReactorNoPoll, Setup::TlsPsk(d)) => s(&[
            "--tls",
            "require",
            "--tls-psk",
            &format!("{}/keys.psk", dir(d)),
        ]),
        (Server::Reactor(_) | Server::ReactorNoPoll, Setup::TlsX509(d)) => s(&[
            "--tls",
            "require",
            "--tls-certificates",
            &format!("{}/server", dir(d)),
        ]),
        (Server::StorageDaemon | Server::QemuNbd, Setup::TlsPsk(d)) => s(&[
            "--object",
            &format!("tls-creds-psk,id=tls0,endpoint=server,dir={}", dir(d)),
        ]),
        (Server::StorageDaemon | Server::QemuNbd, Setup::TlsX509(d)) => s(&[
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=server,dir={}/server,verify-peer=off",
                dir(d)
            ),
        ]),
        (Server::QemuNbd, Setup::Direct) => s(&["--cache=none"]),
        // In its --blockdev (below).
        (Server::StorageDaemon, Setup::Direct) => Vec::new(),
        (Server::Nbdkit, Setup::Direct) => Vec::new(),
        (Server::Nbdkit, Setup::TlsPsk(d)) => {
            s(&["--tls=require", &format!("--tls-psk={}/keys.psk", dir(d))])
        }
        (Server::Nbdkit, Setup::TlsX509(d)) => s(&[
            "--tls=require",
            &format!("--tls-certificates={}/server", dir(d)),
        ]),
    }
}

/// [`start_on`], set up as `setup` says.
pub fn start_setup(server: Server, file: &Path, cpu: Option<usize>, setup: &Setup) -> Running {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let f = file.to_str().expect("a UTF-8 path");
    let extra = setup_args(server, setup);
    let tls = matches!(setup, Setup::TlsPsk(_) | Setup::TlsX509(_));
    let direct = *setup == Setup::Direct;
    let mut cmd = match server {
        Server::Reactor(_) | Server::ReactorNoPoll => {
            let mut c = Command::new(std::env::current_exe().expect("the bench's own path"));
            let backend = match server {
                Server::Reactor(b) => b,
                _ => "uring",
            };
            c.args([SERVE_ARG, "--backend", backend, "-x", "disk"])
                .args(["--bind", &addr.to_string()]);
            if server == Server::ReactorNoPoll {
                c.args(["--poll-max-ns", "0"]);
            }
            // Extra nbd-server options to experiment with (e.g. "--poll-depth 0").
            if let Ok(extra) = std::env::var(EXTRA_ARGS_ENV) {
                c.args(extra.split_whitespace());
            }
            c.args(&extra);
            c.arg(f);
            c
        }
        Server::StorageDaemon => {
            let mut c = Command::new("qemu-storage-daemon");
            let cache = if direct { ",cache.direct=on" } else { "" };
            let creds = if tls { ",tls-creds=tls0" } else { "" };
            c.args(&extra).args([
                "--blockdev",
                &format!("driver=file,node-name=file0,filename={f},aio=io_uring{cache}"),
                "--object",
                "iothread,id=iot0",
                "--nbd-server",
                &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}{creds}"),
                "--export",
                "type=nbd,id=exp0,node-name=file0,name=disk,writable=on,iothread=iot0",
            ]);
            c
        }
        Server::QemuNbd => {
            let mut c = Command::new("qemu-nbd");
            c.args([
                "-f",
                "raw",
                "-x",
                "disk",
                "-b",
                "127.0.0.1",
                "-t",
                // Up to 8 clients at once (1 by default): the multi-connection rows.
                "--shared=8",
                "--aio=io_uring",
            ])
            .args(&extra);
            if tls {
                c.arg("--tls-creds=tls0");
            }
            c.args(["-p", &port.to_string(), f]);
            c
        }
        Server::Nbdkit => {
            let mut c = Command::new("nbdkit");
            c.args(["--exit-with-parent", "-f", "-i", "127.0.0.1", "-e", "disk"])
                .args(&extra)
                .args(["-p", &port.to_string(), "file", &format!("file={f}")]);
            if direct {
                c.arg("cache=none");
            }
            c
        }
    };
    // SAFETY: prctl is async-signal-safe and touches no memory of this process. The server dies
    // with the process that started it: a scenario that crashes or is killed for its time
    // limit leaves no server behind.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(cpu) = cpu {
        super::pin_child(&mut cmd, cpu);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", server.system()));
    if let Server::Reactor(_) | Server::ReactorNoPoll = server {
        // It says when it listens.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("read nbd-server's first line");
        if !line.contains("listening on tcp") {
            // Most likely it refused its arguments and exited: say how it ended (its own
            // message went to standard error, which the bench shares).
            let t0 = Instant::now();
            let ended = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break status.to_string(),
                    Ok(None) if t0.elapsed() < Duration::from_secs(5) => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Ok(None) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break "it was still running, and was killed".into();
                    }
                    Err(e) => break format!("it cannot be waited for: {e}"),
                }
            };
            panic!(
                "nbd-server did not start: its first line was {line:?}, then {ended} (its \
                 error, if any, is on standard error)"
            );
        }
    }
    let t0 = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{} exited at start: {status}", server.system());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} did not listen on {addr} within 10 s",
            server.system()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let proc_cpu = ProcCpu::of(&child);
    let (url, client_env) = match setup {
        Setup::TlsPsk(d) => (
            format!(
                "nbds://alice@127.0.0.1:{port}/disk?tls-psk-file={}/keys.psk",
                d.display()
            ),
            Vec::new(),
        ),
        // The name in the server's certificate; libnbd finds the CA under $HOME/.pki/libnbd.
        Setup::TlsX509(d) => (
            format!("nbds://localhost:{port}/disk"),
            vec![("HOME".to_string(), format!("{}/home", d.display()))],
        ),
        _ => (format!("nbd://{addr}/disk"), Vec::new()),
    };
    Running {
        child,
        addr,
        url,
        client_env,
        proc_cpu,
    }
}

/// Servers started for a whole scenario, each on an export file of its own (QEMU's servers
/// lock their image). A server that cannot start is kept as the reason, so that only its rows
/// fail. The files are removed when this is dropped, however the scenario ends (a process
/// killed at its time limit leaves them to the next run, which recreates them).
#[derive(Default)]
pub struct Fleet {
    pub servers: Vec<(String, PathBuf, Result<Running, String>)>,
}

impl Fleet {
    /// Starts `server` on a fresh `path`, on CPU `cpu` only when given, under the name
    /// `system`.
    pub fn start(&mut self, system: String, server: Server, path: PathBuf, cpu: Option<usize>) {
        self.start_setup(system, server, path, cpu, &Setup::Plain, FILE_SIZE);
    }

    /// [`start`](Self::start), set up as `setup` says, on a file of `size` bytes.
    pub fn start_setup(
        &mut self,
        system: String,
        server: Server,
        path: PathBuf,
        cpu: Option<usize>,
        setup: &Setup,
        size: u64,
    ) {
        let mark = crate::failure::mark();
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            prepare_sized(&path, size);
            start_setup(server, &path, cpu, setup)
        }))
        .map_err(|p| crate::failure::reason(mark, p.as_ref()));
        self.servers.push((system, path, started));
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, path, srv) in self.servers.drain(..) {
            drop(srv);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The running server of a fleet's entry, or a panic with the reason it did not start (which
/// fails the row being measured).
pub fn up<'a>(system: &str, srv: &'a Result<Running, String>) -> &'a Running {
    match srv {
        Ok(s) => s,
        Err(why) => panic!("{system} did not start: {why}"),
    }
}

/// The file, `size` bytes (a multiple of 1 MiB), created (non-zero, so reads are not of
/// holes) or reset, then read once into the page cache.
pub fn prepare_sized(path: &Path, size: u64) {
    let mut chunk = vec![0u8; 1 << 20];
    let mut f = std::fs::File::create(path).expect("create the NBD export file");
    for i in 0..(size >> 20) {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (i as usize * 131 + j * 7 + 1) as u8 | 1;
        }
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
    f.sync_all().unwrap();
    let mut r = std::fs::File::open(path).unwrap();
    std::io::copy(&mut r, &mut std::io::sink()).unwrap();
}

/// After a run that read from `srv`: the export, read back whole through the server
/// (`nbdcopy` to a pipe), must be the bytes of its file, so that a server that answers reads
/// quickly with the wrong bytes fails its row instead of winning it.
pub fn check_reads(srv: &Running, path: &Path, system: &str) {
    let out = std::process::Command::new("nbdcopy")
        .args([srv.url.as_str(), "-"])
        .envs(srv.client_env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run nbdcopy");
    assert!(
        out.status.success(),
        "{system}: reading the export back with nbdcopy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = std::fs::read(path).expect("read the export file");
    assert_eq!(
        out.stdout.len(),
        file.len(),
        "{system}: the export read back has {} bytes, its file {}",
        out.stdout.len(),
        file.len()
    );
    if let Some(i) = out.stdout.iter().zip(&file).position(|(a, b)| a != b) {
        panic!(
            "{system}: byte {i} read through the server is {:#x}, its file has {:#x}",
            out.stdout[i], file[i]
        );
    }
}

/// Whether every peer server, QEMU's client and libnbd's nbdcopy (which checks what the
/// servers read) are installed.
pub fn available() -> bool {
    [
        "qemu-img",
        "qemu-storage-daemon",
        "qemu-nbd",
        "nbdkit",
        "nbdcopy",
    ]
    .iter()
    .all(|t| qemu::available(t))
}

/// `bench --nbd-server ARGS...`: runs the nbd-server program.
pub fn serve(args: impl Iterator<Item = String>) -> std::process::ExitCode {
    nbd_server::args::main(args)
}
