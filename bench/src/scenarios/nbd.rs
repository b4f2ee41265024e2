//! `nbd`: `qemu-img bench` (4 KiB, sequential, reads and writes, queue depth 1 and 32) as
//! the client of the NBD servers of [`super::nbd_servers`] (this repository's `nbd-server`
//! on each backend, `qemu-storage-daemon`, `qemu-nbd`, `nbdkit`), each exporting a
//! page-cached file of its own (the same bytes) over loopback TCP. Requests/s as the client sees them, and the server
//! process's CPU time per request (all its threads, helpers included). The `-1cpu` rows run
//! server and client on CPU 0 only (see [`Case::one_cpu`]).

use std::path::Path;

use super::nbd_servers::{FILE_SIZE, Fleet, Running, SERVERS, Server, available, check_reads, up};
use super::{Ctx, Row, System, qemu};
use crate::measure::{Metric, Sample};

/// The byte qemu-img bench writes, checked in the file afterwards.
const PATTERN: u8 = 0x5a;

#[derive(Clone, Copy, Debug)]
pub(super) struct Case {
    pub(super) write: bool,
    pub(super) depth: usize,
    pub(super) requests: u64,
    /// Server and client both on CPU 0: what the server costs at queue depth 1 without the
    /// scheduler's placement (unpinned, each wake of a halted vCPU of this VM costs tens of
    /// µs, and which servers get woken next to the client decides the QD1 rows).
    pub(super) one_cpu: bool,
}

impl Case {
    /// The row's name, `PREFIX-OP-4k-qdD` (`-1cpu` when pinned).
    pub(super) fn name_in(&self, prefix: &str) -> String {
        let op = if self.write { "write" } else { "read" };
        let pinned = if self.one_cpu { "-1cpu" } else { "" };
        format!("{prefix}-{op}-4k-qd{}{pinned}", self.depth)
    }

    fn name(&self) -> String {
        self.name_in("nbd")
    }
}

/// One `qemu-img bench` run against `srv`: requests/s and the server's CPU per request.
pub(super) fn client_run(srv: &Running, case: Case) -> Sample {
    let url = srv.url.clone();
    let (depth, requests) = (case.depth.to_string(), case.requests.to_string());
    let pattern = format!("--pattern={PATTERN}");
    let mut args = vec!["-f", "raw", "-s", "4096", "-d", &depth, "-c", &requests];
    if case.write {
        args.extend(["-w", &pattern]);
    }
    args.push(&url);
    let cpu0 = srv.cpu();
    let took = qemu::img_bench_on(&args, case.one_cpu.then_some(0));
    let cpu = srv.cpu().since(cpu0);
    Sample::timed(Metric::OpsPerSec, case.requests, took).with_cpu_of(cpu, case.requests)
}

/// Before a write run: the region it writes made different from what it will write (the
/// file's original bytes, whose low bit is set; the pattern's is not), so that
/// [`check_writes`] checks this run's writes, not an earlier run's. Through the page cache,
/// which every server serves the file from.
pub(super) fn unwrite(path: &Path, requests: u64) {
    use std::os::unix::fs::FileExt;
    let written = (requests * 4096).min(FILE_SIZE);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the export file");
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..written.div_ceil(1 << 20) {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (i as usize * 131 + j * 7 + 1) as u8 | 1;
        }
        f.write_all_at(&chunk, i << 20)
            .expect("reset the export file");
    }
}

/// After the write runs: the bytes qemu-img bench wrote must be in the file.
pub(super) fn check_writes(path: &Path, system: &str, requests: u64) {
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

pub fn run(ctx: &Ctx) -> Vec<Row> {
    assert!(
        available(),
        "the nbd scenario needs qemu-img, qemu-storage-daemon, qemu-nbd, nbdkit and nbdcopy \
         on the PATH (Debian/Ubuntu: apt-get install qemu-utils nbdkit libnbd-bin)"
    );
    let dir = Path::new("target").join("bench-data");
    std::fs::create_dir_all(&dir).expect("create target/bench-data");
    let cases = [
        (false, 1, ctx.scale(40_000, 3_000), false),
        (false, 32, ctx.scale(200_000, 15_000), false),
        (true, 1, ctx.scale(40_000, 3_000), false),
        (true, 32, ctx.scale(100_000, 8_000), false),
        (false, 1, ctx.scale(100_000, 10_000), true),
        (true, 1, ctx.scale(100_000, 10_000), true),
    ]
    .map(|(write, depth, requests, one_cpu)| Case {
        write,
        depth,
        requests,
        one_cpu,
    });
    // One process per server and placement (a pinned one for the one-CPU rows), each with a
    // file of its own (QEMU's servers lock their image), all running for the whole scenario,
    // so that each row's runs go in rounds over the servers (see `Ctx::interleave`).
    // The reactor without polling too: what its default polling buys a queue-depth-1 client
    // (and that it stays out of the way of a deep queue).
    let servers = SERVERS.iter().copied().chain([Server::ReactorNoPoll]);
    let mut fleets = [Fleet::default(), Fleet::default()]; // unpinned, pinned
    for server in servers {
        for (one_cpu, fleet) in [false, true].into_iter().zip(fleets.iter_mut()) {
            let system = server.system();
            let pinned = if one_cpu { "-1cpu" } else { "" };
            let path = dir.join(format!("nbd-64M-{system}{pinned}.img"));
            fleet.start(system, server, path, one_cpu.then_some(0));
        }
    }
    let mut rows = Vec::new();
    for case in cases {
        let systems = fleets[usize::from(case.one_cpu)]
            .servers
            .iter()
            .map(|(system, path, srv)| {
                System::new(system.as_str(), move || {
                    let srv = up(system, srv);
                    if case.write {
                        unwrite(path, case.requests);
                    }
                    let sample = client_run(srv, case);
                    if case.write {
                        check_writes(path, system, case.requests);
                    } else {
                        check_reads(srv, path, system);
                    }
                    sample
                })
            })
            .collect();
        rows.extend(ctx.interleave(&case.name(), Metric::OpsPerSec, systems));
    }
    rows
}
