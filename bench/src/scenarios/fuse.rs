//! `fuse`: fio on a FUSE-mounted image, 4 KiB random reads, random writes and a 70/30 mix, at
//! queue depth 1 (`psync`) and 32 (`io_uring`), with 1 and 2 jobs, against:
//!
//! - `nbd-server --fuse` on io_uring with the io_uring transport (`reactor-uring`), with the
//!   classic one (`reactor-uring-classic`), and on epoll (classic, `reactor-epoll`); two
//!   IoThreads, the image through the page cache;
//! - `qemu-storage-daemon --export type=fuse` through the page cache
//!   (`qemu-storage-daemon`, `cache.direct=off`) and around it (`qemu-storage-daemon-direct`,
//!   `cache.direct=on,aio=io_uring`);
//! - the ceiling: the same fio job on an image file directly, no FUSE (`ceiling-no-fuse`,
//!   through the page cache, as the servers' images are): what crossing into user space and
//!   back costs is each system's distance from it.
//!
//! fio opens the mounted file with `O_DIRECT` (no page cache on the FUSE side, on every
//! system). Requests/s from fio's run time, and the server process's CPU per request. Writes
//! carry fio's checksums and are read back and checked; after each 70/30 run the mounted file
//! is compared with its image.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::nbd_fio::{self, Case};
use super::nbd_servers::{ProcCpu, prepare_sized};
use super::{Ctx, Row, System};
use crate::measure::{Metric, Sample};

/// The images' size.
const SIZE: u64 = 256 << 20;

/// A FUSE server measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    /// nbd-server on `backend` with `transport`.
    Reactor(&'static str, &'static str),
    /// qemu-storage-daemon, `direct` or through the page cache.
    StorageDaemon { direct: bool },
}

const SERVERS: [Server; 5] = [
    Server::Reactor("uring", "uring"),
    Server::Reactor("uring", "classic"),
    Server::Reactor("epoll", "classic"),
    Server::StorageDaemon { direct: false },
    Server::StorageDaemon { direct: true },
];

impl Server {
    fn system(self) -> &'static str {
        match self {
            Server::Reactor("uring", "uring") => "reactor-uring",
            Server::Reactor("uring", _) => "reactor-uring-classic",
            Server::Reactor(..) => "reactor-epoll",
            Server::StorageDaemon { direct: false } => "qemu-storage-daemon",
            Server::StorageDaemon { direct: true } => "qemu-storage-daemon-direct",
        }
    }
}

/// A server with its image mounted; stopped (SIGTERM, then SIGKILL) and unmounted on drop.
struct Mounted {
    child: Child,
    img: PathBuf,
    mnt: PathBuf,
    cpu: ProcCpu,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while self.child.try_wait().ok().flatten().is_none()
            && t0.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        lazy_unmount(&self.mnt);
        let _ = std::fs::remove_file(&self.mnt);
        let _ = std::fs::remove_file(&self.img);
    }
}

/// Whether `path` (canonical) is a mountpoint now.
fn mounted(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|p| p.as_bytes() == path.as_os_str().as_bytes())
    })
}

fn lazy_unmount(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("a path without NUL");
    while mounted(path) {
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            break;
        }
    }
}

/// Starts `server` on a new image in `dir` and waits until its export is mounted.
fn start(server: Server, dir: &Path) -> Mounted {
    let img = dir.join(format!("fuse-{}.img", server.system()));
    prepare_sized(&img, SIZE);
    let mnt = std::fs::canonicalize(dir)
        .expect("the data dir")
        .join(format!("fuse-{}.mnt", server.system()));
    lazy_unmount(&mnt);
    std::fs::write(&mnt, b"").expect("create the mountpoint");
    let mut cmd = match server {
        Server::Reactor(backend, transport) => {
            let mut c = Command::new(std::env::current_exe().expect("the bench's own path"));
            c.args([
                super::nbd_servers::SERVE_ARG,
                "--backend",
                backend,
                "--iothreads",
                "2",
            ])
            .args(["--fuse-transport", transport, "--fuse"])
            .arg(&mnt)
            .arg(&img);
            c
        }
        Server::StorageDaemon { direct } => {
            let mut c = Command::new("qemu-storage-daemon");
            let file = if direct {
                format!(
                    "driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring",
                    img.display()
                )
            } else {
                format!("driver=file,node-name=file0,filename={}", img.display())
            };
            c.args(["--blockdev", &file])
                .args(["--blockdev", "driver=raw,node-name=raw0,file=file0"])
                .args([
                    "--export",
                    &format!(
                        "type=fuse,id=exp0,node-name=raw0,mountpoint={},writable=on",
                        mnt.display()
                    ),
                ]);
            c
        }
    };
    // SAFETY: prctl in the child before exec: it dies with the bench.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", server.system()));
    if let Server::Reactor(_, transport) = server {
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("nbd-server's line");
        assert!(
            line.contains(&format!("({transport} transport)")),
            "{}: expected the {transport} transport, got {line:?}",
            server.system()
        );
    }
    let t0 = Instant::now();
    while !mounted(&mnt) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{} exited at start: {status}", server.system());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} did not mount within 10 s",
            server.system()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let cpu = ProcCpu::of(&child);
    Mounted {
        child,
        img,
        mnt,
        cpu,
    }
}

/// After a run that wrote: the mounted file reads as its image.
fn check_coherent(m: &Mounted, system: &str) {
    let through = std::fs::read(&m.mnt).expect("read the mounted file");
    let image = std::fs::read(&m.img).expect("read the image");
    assert_eq!(through.len(), image.len(), "{system}: sizes");
    if let Some(i) = through.iter().zip(&image).position(|(a, b)| a != b) {
        panic!("{system}: byte {i} of the mounted file differs from its image");
    }
}

pub fn run(ctx: &Ctx) -> Vec<Row> {
    assert!(
        Path::new("/dev/fuse").exists()
            && super::qemu::available("qemu-storage-daemon")
            && nbd_fio::available(),
        "the fuse scenario needs /dev/fuse (and root), fio and qemu-storage-daemon"
    );
    assert!(
        nbd_server::fuse::kernel_offers_uring(),
        "the fuse scenario measures FUSE over io_uring: as root, \
         echo 1 > /sys/module/fuse/parameters/enable_uring (.ci/run does)"
    );
    let dir = Path::new("target").join("bench-data");
    std::fs::create_dir_all(&dir).expect("create target/bench-data");
    let mut cases = Vec::new();
    for jobs in [1, 2] {
        for rw in ["randread", "randwrite", "randrw"] {
            for depth in [1, 32] {
                let requests = if depth == 1 {
                    ctx.scale(60_000, 8_000)
                } else {
                    ctx.scale(300_000, 40_000)
                };
                cases.push(Case {
                    rw,
                    depth,
                    jobs,
                    requests,
                });
            }
        }
    }
    let servers: Vec<(Server, Result<Mounted, String>)> = SERVERS
        .iter()
        .map(|&s| {
            let mark = crate::failure::mark();
            let m = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| start(s, &dir)))
                .map_err(|p| crate::failure::reason(mark, p.as_ref()));
            (s, m)
        })
        .collect();
    let ceiling = dir.join("fuse-ceiling.img");
    prepare_sized(&ceiling, SIZE);
    let mut rows = Vec::new();
    for case in cases {
        // Each job its own part of the file, so that writes verify.
        let part = SIZE / u64::from(case.jobs);
        let size = format!("{}M", part >> 20);
        let spread = format!("--offset_increment={}M", part >> 20);
        let engine = if case.depth == 1 {
            "--ioengine=psync"
        } else {
            "--ioengine=io_uring"
        };
        // Through the page cache, as the servers' images are (and kept there: fio's default
        // is to drop a file's cached pages before each job).
        let ceiling_target = [
            engine.to_string(),
            format!("--filename={}", ceiling.display()),
            "--invalidate=0".to_string(),
            spread.clone(),
        ];
        let name = case.name_in("fuse");
        // The ceiling goes some 10-20 times faster: more requests, for a run of similar
        // length (fio times in whole ms), but no more than the file's blocks (fio's
        // verification of random writes that overwrite each other crawls).
        let ceiling_case = Case {
            requests: (case.requests * 16).min(SIZE / 4096),
            ..case
        };
        let mut systems = vec![System::new("ceiling-no-fuse", {
            let size = size.clone();
            move || nbd_fio::fio(&ceiling_target, &[], None, ceiling_case, &size)
        })];
        for (server, m) in &servers {
            let system = server.system();
            let (size, spread) = (size.clone(), spread.clone());
            systems.push(System::new(system, move || {
                let m = match m {
                    Ok(m) => m,
                    Err(why) => panic!("{system} did not start: {why}"),
                };
                let target = [
                    engine.to_string(),
                    "--direct=1".to_string(),
                    format!("--filename={}", m.mnt.display()),
                    spread.clone(),
                ];
                let sample: Sample = nbd_fio::fio(&target, &[], Some(&m.cpu), case, &size);
                if case.rw == "randrw" {
                    check_coherent(m, system);
                }
                sample
            }));
        }
        rows.extend(ctx.interleave(&name, Metric::OpsPerSec, systems));
    }
    drop(servers);
    let _ = std::fs::remove_file(ceiling);
    rows
}
