//! `nbd`: `qemu-img bench` (4 KiB, sequential, reads and writes, queue depth 1 and 32) as
//! the client of four NBD servers exporting the same page-cached file over loopback TCP:
//! this repository's `nbd-server` on each backend, `qemu-storage-daemon` with an iothread,
//! and `qemu-nbd`. Requests/s as the client sees them, and the server process's CPU time per
//! request (all its threads, helpers included, from its process CPU clock).
//!
//! The reactor servers are the `nbd-server` program itself ([`nbd_server::args::main`]) run
//! in a child process of the bench (`bench --nbd-server ARGS`), like the QEMU peers.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Ctx, Row, qemu};
use crate::measure::{Metric, Sample};

/// The exported file's size: qemu-img bench's sequential offsets wrap at its end.
const FILE_SIZE: u64 = 64 << 20;
/// The byte qemu-img bench writes, checked in the file afterwards.
const PATTERN: u8 = 0x5a;

/// Extra options for the reactor servers (`nbd-server --help`), split at whitespace.
pub const EXTRA_ARGS_ENV: &str = "BENCH_NBD_SERVER_ARGS";

/// The hidden argument that turns the bench binary into `nbd-server`.
pub const SERVE_ARG: &str = "--nbd-server";

#[derive(Clone, Copy, Debug)]
struct Case {
    write: bool,
    depth: usize,
    requests: u64,
}

impl Case {
    fn name(&self) -> String {
        let op = if self.write { "write" } else { "read" };
        format!("nbd-{op}-4k-qd{}", self.depth)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    Reactor(&'static str),
    StorageDaemon,
    QemuNbd,
}

impl Server {
    fn system(self) -> String {
        match self {
            Server::Reactor(b) => format!("reactor-{b}"),
            Server::StorageDaemon => "qemu-storage-daemon".into(),
            Server::QemuNbd => "qemu-nbd".into(),
        }
    }
}

/// A running server process, killed on drop.
struct Running {
    child: Child,
    addr: SocketAddr,
    clock: libc::clockid_t,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
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

fn start(server: Server, file: &Path) -> Running {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let f = file.to_str().expect("a UTF-8 path");
    let mut cmd = match server {
        Server::Reactor(backend) => {
            let mut c = Command::new(std::env::current_exe().expect("the bench's own path"));
            c.args([SERVE_ARG, "--backend", backend, "-x", "disk"])
                .args(["--bind", &addr.to_string()]);
            // Extra nbd-server options to experiment with (e.g. "--poll-max-ns 0").
            if let Ok(extra) = std::env::var(EXTRA_ARGS_ENV) {
                c.args(extra.split_whitespace());
            }
            c.arg(f);
            c
        }
        Server::StorageDaemon => {
            let mut c = Command::new("qemu-storage-daemon");
            c.args([
                "--blockdev",
                &format!("driver=file,node-name=file0,filename={f},aio=io_uring"),
                "--object",
                "iothread,id=iot0",
                "--nbd-server",
                &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
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
                "--aio=io_uring",
            ])
            .args(["-p", &port.to_string(), f]);
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
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", server.system()));
    if let Server::Reactor(_) = server {
        // It says when it listens.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("read nbd-server's first line");
        assert!(
            line.contains("listening on tcp"),
            "nbd-server said {line:?}"
        );
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
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid out-pointer; the pid is our live child.
    let rc = unsafe { libc::clock_getcpuclockid(child.id() as libc::pid_t, &mut clock) };
    assert_eq!(rc, 0, "no CPU clock for the server process");
    Running { child, addr, clock }
}

/// One `qemu-img bench` run against `srv`: requests/s and the server's CPU per request.
fn client_run(srv: &Running, case: Case) -> Sample {
    let url = format!("nbd://{}/disk", srv.addr);
    let (depth, requests) = (case.depth.to_string(), case.requests.to_string());
    let pattern = format!("--pattern={PATTERN}");
    let mut args = vec!["-f", "raw", "-s", "4096", "-d", &depth, "-c", &requests];
    if case.write {
        args.extend(["-w", &pattern]);
    }
    args.push(&url);
    let cpu0 = srv.cpu_ns();
    let took = qemu::img_bench(&args);
    let cpu = srv.cpu_ns() - cpu0;
    Sample::timed(Metric::OpsPerSec, case.requests, took)
        .with_cpu(cpu as f64 / case.requests as f64)
}

/// The file, created (non-zero, so reads are not of holes) or reset, then read once into the
/// page cache.
fn prepare(path: &Path) {
    let mut chunk = vec![0u8; 1 << 20];
    let mut f = std::fs::File::create(path).expect("create the NBD export file");
    for i in 0..(FILE_SIZE >> 20) {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (i as usize * 131 + j * 7 + 1) as u8 | 1;
        }
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
    f.sync_all().unwrap();
    let mut r = std::fs::File::open(path).unwrap();
    std::io::copy(&mut r, &mut std::io::sink()).unwrap();
}

/// After the write runs: the bytes qemu-img bench wrote must be in the file.
fn check_writes(path: &Path, system: &str, requests: u64) {
    let data = std::fs::read(path).expect("read back the export file");
    let written = (requests * 4096).min(FILE_SIZE) as usize;
    let bad = data[..written].iter().position(|&b| b != PATTERN);
    assert!(
        bad.is_none(),
        "{system}: byte {} of the export is {:#x}, not the pattern qemu-img bench wrote",
        bad.unwrap_or(0),
        data[bad.unwrap_or(0)]
    );
}

pub fn available() -> bool {
    ["qemu-img", "qemu-storage-daemon", "qemu-nbd"]
        .iter()
        .all(|t| qemu::available(t))
}

pub fn run(ctx: &Ctx) -> Vec<Row> {
    assert!(
        available(),
        "the nbd scenario needs qemu-img, qemu-storage-daemon and qemu-nbd on the PATH \
         (Debian/Ubuntu: apt-get install qemu-utils)"
    );
    let dir = Path::new("target").join("bench-data");
    std::fs::create_dir_all(&dir).expect("create target/bench-data");
    let path: PathBuf = dir.join("nbd-64M.img");
    let cases = [
        (false, 1, ctx.scale(40_000, 3_000)),
        (false, 32, ctx.scale(200_000, 15_000)),
        (true, 1, ctx.scale(40_000, 3_000)),
        (true, 32, ctx.scale(100_000, 8_000)),
    ]
    .map(|(write, depth, requests)| Case {
        write,
        depth,
        requests,
    });
    let servers = [
        Server::Reactor("uring"),
        Server::Reactor("epoll"),
        Server::StorageDaemon,
        Server::QemuNbd,
    ];
    // Servers in the outer loop (one process serves all of its rows), rows grouped after.
    let mut by_case: Vec<Vec<Row>> = cases.iter().map(|_| Vec::new()).collect();
    for server in servers {
        prepare(&path);
        let system = server.system();
        let srv = start(server, &path);
        for (i, case) in cases.iter().enumerate() {
            let row = ctx.row(&case.name(), &system, Metric::OpsPerSec, || {
                client_run(&srv, *case)
            });
            if case.write {
                check_writes(&path, &system, case.requests);
            }
            by_case[i].push(row);
        }
        drop(srv);
    }
    by_case.into_iter().flatten().collect()
}

/// `bench --nbd-server ARGS...`: runs the nbd-server program.
pub fn serve(args: impl Iterator<Item = String>) -> std::process::ExitCode {
    nbd_server::args::main(args)
}
