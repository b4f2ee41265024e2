//! `nbd-direct`: the clients of `nbd` and `nbd-fio` against the servers of
//! [`super::nbd_servers`], each bypassing the page cache ([`Setup::Direct`]), on a file on the
//! machine's disk (the target directory; the scenario refuses tmpfs): `qemu-img bench`
//! (4 KiB sequential reads and writes, queue depth 1 and 32) and fio's NBD engine (4 KiB
//! random and sequential reads and writes at queue depth 1 and 32). The floor is fio itself
//! on the same kind of file with its io_uring engine and `O_DIRECT` (no NBD, no server), in
//! the row's pattern and depth: what the disk gives it. Requests/s, and the server's CPU per
//! request.

use std::path::Path;

use super::nbd;
use super::nbd_fio::{self, Case};
use super::nbd_servers::{Fleet, SERVERS, Setup, up};
use super::{Ctx, Row, System};
use crate::measure::Metric;

/// The exported files' size.
const SIZE: u64 = 256 << 20;

/// Whether `dir` is on tmpfs (where `O_DIRECT` would measure memory, not a disk).
fn on_tmpfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("a path without NUL");
    // SAFETY: an all-zero statfs is a valid value of the plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statfs {}", dir.display());
    st.f_type == libc::TMPFS_MAGIC
}

pub fn run(ctx: &Ctx) -> Vec<Row> {
    assert!(
        nbd_fio::available() && super::nbd_servers::available(),
        "the nbd-direct scenario needs fio (with its nbd and io_uring engines), \
         qemu-storage-daemon, qemu-nbd, nbdkit and nbdcopy on the PATH (Debian/Ubuntu: \
         apt-get install fio qemu-utils nbdkit libnbd-bin)"
    );
    let dir = Path::new("target").join("bench-data");
    std::fs::create_dir_all(&dir).expect("create target/bench-data");
    assert!(
        !on_tmpfs(&dir),
        "nbd-direct measures a disk: target/bench-data is on tmpfs"
    );
    // Quick runs of about a second at QD32 (a tenth of a second left the rows to the start of
    // each run: connection, first buffers, the disk's first batches).
    let cases = [
        ("randread", 1, ctx.scale(20_000, 3_000)),
        ("randread", 32, ctx.scale(100_000, 30_000)),
        ("read", 32, ctx.scale(200_000, 40_000)),
        ("randwrite", 1, ctx.scale(20_000, 3_000)),
        ("randwrite", 32, ctx.scale(100_000, 30_000)),
        ("write", 32, ctx.scale(200_000, 40_000)),
    ]
    .map(|(rw, depth, requests)| Case {
        rw,
        depth,
        jobs: 1,
        requests,
    });
    let mut fleet = Fleet::default();
    for server in SERVERS {
        let system = server.system();
        let path = dir.join(format!("nbd-direct-{system}.img"));
        fleet.start_setup(system, server, path, None, &Setup::Direct, SIZE);
    }
    let floor = dir.join("nbd-direct-floor.img");
    super::nbd_servers::prepare_sized(&floor, SIZE);
    let floor_target = [
        "--ioengine=io_uring".to_string(),
        "--direct=1".into(),
        format!("--filename={}", floor.display()),
    ];
    let size = format!("{}M", SIZE >> 20);
    let mut rows = Vec::new();
    // qemu-img bench's rows: sequential, from offset 0 and wrapping at the end.
    let bench_cases = [
        (false, 1, ctx.scale(40_000, 3_000)),
        (false, 32, ctx.scale(200_000, 40_000)),
        (true, 1, ctx.scale(40_000, 3_000)),
        (true, 32, ctx.scale(100_000, 20_000)),
    ]
    .map(|(write, depth, requests)| nbd::Case {
        write,
        depth,
        requests,
        one_cpu: false,
    });
    for case in bench_cases {
        let floor_case = Case {
            rw: if case.write { "write" } else { "read" },
            depth: case.depth as u32,
            jobs: 1,
            requests: case.requests,
        };
        let mut systems = vec![System::new("floor-fio-uring-direct", || {
            nbd_fio::fio(&floor_target, &[], None, floor_case, &size)
        })];
        for (system, path, srv) in &fleet.servers {
            systems.push(System::new(system.as_str(), move || {
                let srv = up(system, srv);
                if case.write {
                    nbd::unwrite(path, case.requests);
                }
                let sample = nbd::client_run(srv, case);
                if case.write {
                    nbd::check_writes(path, system, case.requests);
                } else if case.depth == 32 {
                    // The whole 256 MiB export read back: once per run of one row.
                    super::nbd_servers::check_reads(srv, path, system);
                }
                sample
            }));
        }
        rows.extend(ctx.interleave(
            &case.name_in("nbd-direct-bench"),
            Metric::OpsPerSec,
            systems,
        ));
    }
    for case in cases {
        let mut systems = vec![System::new("floor-fio-uring-direct", || {
            nbd_fio::fio(&floor_target, &[], None, case, &size)
        })];
        for (system, path, srv) in &fleet.servers {
            let size = size.clone();
            systems.push(System::new(system.as_str(), move || {
                let srv = up(system, srv);
                let sample = nbd_fio::client_run(srv, case, &size);
                if case.rw == "randread" && case.depth == 32 {
                    super::nbd_servers::check_reads(srv, path, system);
                }
                sample
            }));
        }
        rows.extend(ctx.interleave(&case.name_in("nbd-direct"), Metric::OpsPerSec, systems));
    }
    drop(fleet);
    let _ = std::fs::remove_file(floor);
    rows
}
