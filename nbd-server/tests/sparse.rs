//! Sparse exports through real clients, on both backends: `qemu-img map` and `nbdinfo --map`
//! see the holes (BLOCK_STATUS over `base:allocation`), and `qemu-img convert` and `nbdcopy`
//! with four connections (multi-conn) copy a sparse 4 GiB export into an identical, sparse
//! file, and back into an export. The tools must be installed (`apt-get install qemu-utils
//! libnbd-bin`; `.ci/run` does it): without them these tests fail, they are not skipped.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::served::{random_bytes, run, scratch};
use nbd_server::{Config, Server};
use tests::backend_tests;

const SIZE: u64 = 4 << 30;
const MIB: u64 = 1 << 20;
/// Where the source has data: (offset, length); holes elsewhere.
const DATA: [(u64, u64); 3] = [
    (MIB, 8 * MIB),
    (1 << 30, 4 * MIB),
    (SIZE - 8 * MIB, 8 * MIB),
];

/// A sparse file of `SIZE` bytes with random data at `DATA`.
fn sparse_source(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    for (i, (at, len)) in DATA.into_iter().enumerate() {
        f.write_all_at(&random_bytes(len as usize, i as u64 + 1), at)
            .unwrap();
    }
}

/// An empty (all-hole) file of `SIZE` bytes.
fn empty(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(SIZE).unwrap();
}

fn serve(r: &tests::Reactor, file: &Path) -> (Server, String) {
    let mut cfg = Config::new(file);
    cfg.export_name = "disk".into();
    cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
    cfg.backend = r.backend();
    let srv = Server::start(cfg).expect("start the server");
    let url = format!("nbd://{}/disk", srv.tcp_addr().unwrap());
    (srv, url)
}

/// The data ranges of a file, from `SEEK_DATA`/`SEEK_HOLE`.
fn data_map(path: &Path) -> Vec<(u64, u64)> {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let seek = |pos: u64, whence| {
        // SAFETY: lseek on an open fd; no memory involved.
        let r = unsafe { libc::lseek(f.as_raw_fd(), pos as i64, whence) };
        (r >= 0).then_some(r as u64)
    };
    let mut v = Vec::new();
    let mut pos = 0;
    while let Some(d) = seek(pos, libc::SEEK_DATA).filter(|&d| d < len) {
        let h = seek(d, libc::SEEK_HOLE).unwrap();
        v.push((d, h - d));
        pos = h;
    }
    v
}

/// `dst` has `src`'s size and bytes, and holds no more than 1 MiB of allocation beyond its
/// data: compared where either file has data; elsewhere both are holes, so both are zeros.
fn assert_same_and_sparse(src: &Path, dst: &Path) {
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (
        std::fs::File::open(src).unwrap(),
        std::fs::File::open(dst).unwrap(),
    );
    assert_eq!(
        b.metadata().unwrap().len(),
        SIZE,
        "size of {}",
        dst.display()
    );
    let data: u64 = DATA.iter().map(|d| d.1).sum();
    let allocated = b.metadata().unwrap().blocks() * 512;
    assert!(
        allocated <= data + MIB,
        "{} is not sparse: {allocated} bytes allocated",
        dst.display()
    );
    for (at, len) in data_map(src).into_iter().chain(data_map(dst)) {
        let (mut x, mut y) = (vec![0u8; len as usize], vec![0u8; len as usize]);
        a.read_exact_at(&mut x, at).unwrap();
        b.read_exact_at(&mut y, at).unwrap();
        assert!(
            x == y,
            "{} differs from {} in [{at}, +{len})",
            dst.display(),
            src.display()
        );
    }
}

/// The numbers after each `"key": ` in `line`.
fn field(line: &str, key: &str) -> Option<String> {
    let rest = &line[line.find(&format!("\"{key}\": "))? + key.len() + 4..];
    Some(rest.split([',', '}']).next()?.trim().to_string())
}

/// Neighbouring ranges merged.
fn merged(v: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (at, len) in v {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == at => last.1 += len,
            _ => out.push((at, len)),
        }
    }
    out
}

backend_tests! {
    fn qemu_img_map_and_nbdinfo_map_report_the_holes(r: &Reactor) {
        let src = scratch("map", &r.backend().to_string());
        sparse_source(&src);
        let (srv, url) = serve(r, &src);
        let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &url]);
        let data = merged(map.lines().filter(|l| field(l, "data").as_deref() == Some("true")).map(|l| {
            (field(l, "start").unwrap().parse().unwrap(), field(l, "length").unwrap().parse().unwrap())
        }));
        assert_eq!(data, DATA, "qemu-img map: {map}");
        assert!(map.contains("\"zero\": true"), "holes read as zeros: {map}");
        // nbdinfo --map: offset, length, type (0 data, 3 hole and zero), description.
        let map = run("nbdinfo", &["--map", &url]);
        let rows: Vec<(u64, u64, u32)> = map
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
            })
            .collect();
        assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), SIZE, "{map}");
        let data = merged(rows.iter().filter(|r| r.2 == 0).map(|r| (r.0, r.1)));
        assert_eq!(data, DATA, "nbdinfo --map: {map}");
        assert!(rows.iter().all(|r| r.2 == 0 || r.2 == 3), "{map}");
        drop(srv);
        std::fs::remove_file(src).unwrap();
    }

    fn qemu_img_convert_copies_a_sparse_export_sparsely(r: &Reactor) {
        let backend = r.backend().to_string();
        let (src, dst) = (scratch("convert-sparse-src", &backend), scratch("convert-sparse-dst", &backend));
        sparse_source(&src);
        let (srv, url) = serve(r, &src);
        run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &url, dst.to_str().unwrap()]);
        assert_same_and_sparse(&src, &dst);
        drop(srv);
        for p in [src, dst] {
            std::fs::remove_file(p).unwrap();
        }
    }

    fn nbdcopy_with_four_connections_both_ways(r: &Reactor) {
        let backend = r.backend().to_string();
        let names = ["nbdcopy-src", "nbdcopy-dst", "nbdcopy-export"];
        let [src, dst, export]: [PathBuf; 3] = names.map(|n| scratch(n, &backend));
        sparse_source(&src);
        // Out of an export into a file.
        let (srv, url) = serve(r, &src);
        run("nbdcopy", &["--connections=4", "--threads=4", &url, dst.to_str().unwrap()]);
        assert_same_and_sparse(&src, &dst);
        assert!(srv.stats().connections >= 4, "multi-conn: {:?}", srv.stats());
        drop(srv);
        // Out of a file into an empty export, flushed at the end.
        empty(&export);
        let (srv, url) = serve(r, &export);
        run("nbdcopy", &["--connections=4", "--threads=4", "--flush", src.to_str().unwrap(), &url]);
        let st = srv.stats();
        assert!(st.connections >= 4 && st.syncs >= 1, "{st:?}");
        drop(srv);
        assert_same_and_sparse(&src, &export);
        for p in [src, dst, export] {
            std::fs::remove_file(p).unwrap();
        }
    }
}
