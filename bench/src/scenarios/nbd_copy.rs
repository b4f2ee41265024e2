//! `nbd-sparse-copy`: `nbdcopy` (libnbd) copies a 4 GiB export holding 64 MiB of data (16
//! runs of 4 MiB spread over it, holes between) into a file, from each server of
//! [`super::nbd_servers`]. A server that reports its holes (BLOCK_STATUS over
//! `base:allocation`) is copied by reading only its data; one that does not sends 4 GiB of
//! zeros. Time per copy (lower is better) and the server's CPU per copy; each copy is checked
//! to hold the source's bytes and to be sparse.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use super::nbd_servers::{SERVERS, start};
use super::{Ctx, Row};
use crate::measure::{Metric, Sample};

const SIZE: u64 = 4 << 30;
const PIECES: u64 = 16;
const PIECE: u64 = 4 << 20;

/// Where piece `i` of the data lies.
fn piece_at(i: u64) -> u64 {
    i * (SIZE / PIECES) + (1 << 20)
}

fn piece(i: u64) -> Vec<u8> {
    (0..PIECE)
        .map(|j| (j.wrapping_mul(2_654_435_761) >> 13) as u8 ^ i as u8 | 1)
        .collect()
}

/// The sparse source: holes, and the pieces of data.
fn source(path: &Path) {
    let f = std::fs::File::create(path).expect("create the sparse export");
    f.set_len(SIZE).unwrap();
    for i in 0..PIECES {
        f.write_all_at(&piece(i), piece_at(i)).unwrap();
    }
    f.sync_all().unwrap();
}

/// The copy has the source's size, its pieces, zeros between them (it is compared only where
/// the source has data, so it must be sparse: at most 1 MiB of allocation beyond the data).
fn check(copy: &Path, system: &str) {
    let f = std::fs::File::open(copy).expect("the copy exists");
    let meta = f.metadata().unwrap();
    assert_eq!(meta.len(), SIZE, "{system}: size of the copy");
    let allocated = meta.blocks() * 512;
    assert!(
        allocated <= PIECES * PIECE + (1 << 20),
        "{system}: the copy is not sparse ({allocated} bytes allocated)"
    );
    let mut buf = vec![0u8; PIECE as usize];
    for i in 0..PIECES {
        f.read_exact_at(&mut buf, piece_at(i)).unwrap();
        assert!(buf == piece(i), "{system}: piece {i} of the copy differs");
    }
}

/// Whether nbdcopy is installed.
pub fn available() -> bool {
    Command::new("nbdcopy")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn run(ctx: &Ctx) -> Vec<Row> {
    assert!(
        available() && super::nbd_servers::available(),
        "the nbd-sparse-copy scenario needs nbdcopy, qemu-storage-daemon, qemu-nbd and nbdkit \
         on the PATH (Debian/Ubuntu: apt-get install libnbd-bin qemu-utils nbdkit)"
    );
    let dir = Path::new("target").join("bench-data");
    std::fs::create_dir_all(&dir).expect("create target/bench-data");
    let (src, dst) = (
        dir.join("nbd-sparse-4G.img"),
        dir.join("nbd-sparse-copy.img"),
    );
    source(&src);
    let mut rows = Vec::new();
    for server in SERVERS {
        let system = server.system();
        let srv = start(server, &src);
        let url = format!("nbd://{}/disk", srv.addr);
        // One copy, timed; checked afterwards.
        let copy = || {
            let _ = std::fs::remove_file(&dst);
            let t0 = Instant::now();
            let out = Command::new("nbdcopy")
                .args([url.as_str(), dst.to_str().expect("a UTF-8 path")])
                .output()
                .expect("run nbdcopy");
            let took = t0.elapsed();
            assert!(
                out.status.success(),
                "nbdcopy from {system} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            check(&dst, &system);
            took
        };
        // A first copy unmeasured (the server's buffers, the destination's blocks); then each
        // run is the mean of several copies: one takes ~60 ms, too short to time alone here.
        let copies = ctx.scale(10, 4);
        let warm = std::cell::Cell::new(false);
        rows.push(ctx.row("nbd-sparse-copy", &system, Metric::NsPerOp, || {
            if !warm.replace(true) {
                copy();
            }
            // The server's CPU time over the copies (it is idle while each copy is checked).
            let cpu0 = srv.cpu();
            let took = (0..copies).map(|_| copy()).sum();
            Sample::timed(Metric::NsPerOp, copies, took).with_cpu_of(srv.cpu().since(cpu0), copies)
        }));
        drop(srv);
    }
    let _ = std::fs::remove_file(&dst);
    let _ = std::fs::remove_file(&src);
    rows
}
