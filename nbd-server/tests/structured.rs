//! Structured replies, `base:allocation` block status, CACHE and multi-conn against a raw
//! client, on both backends.

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use common::*;
use nbd_server::{Config, Server};
use structured::{FLAG_DONE, kind, state};
use tests::backend_tests;

const SIZE: u64 = 4 << 20;
const K: u64 = 1024;
/// Where the sparse test file has data; holes elsewhere.
const DATA: [(u64, u64); 3] = [(64 * K, 64 * K), (1024 * K, 200 * K), (4032 * K, 64 * K)];

/// A 4 MiB file with data (a pattern) at [`DATA`] and holes elsewhere.
fn sparse_file(tag: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("nbd-sparse-{tag}-{}.img", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    for (at, len) in DATA {
        f.write_all_at(&content(at, len as usize), at).unwrap();
    }
    f.sync_all().unwrap();
    path
}

fn content(at: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((at + i) % 253) as u8 | 1)
        .collect()
}

fn start(r: &tests::Reactor, tag: &str) -> (Server, PathBuf) {
    let path = sparse_file(&format!("{tag}-{}", r.backend()));
    let mut cfg = Config::new(&path);
    cfg.export_name = "disk".into();
    cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
    cfg.backend = r.backend();
    (Server::start(cfg).expect("start the server"), path)
}

fn client(s: &Server) -> Client {
    Client::connect(s.tcp_addr().unwrap())
}

/// The extents the file should report from `at` to `end`: (length, hole).
fn expected_map(at: u64, end: u64) -> Vec<(u64, u32)> {
    let mut v: Vec<(u64, u32)> = Vec::new();
    let mut pos = at;
    let hole = state::HOLE | state::ZERO;
    for (d, len) in DATA.iter().copied().chain([(SIZE, 0)]) {
        if pos < d.min(end) {
            v.push((d.min(end) - pos, hole));
            pos = d.min(end);
        }
        let stop = (d + len).min(end);
        if pos < stop {
            v.push((stop - pos, 0));
            pos = stop;
        }
    }
    v
}

backend_tests! {
    fn structured_replies_and_meta_contexts_are_negotiated(r: &Reactor) {
        let (srv, path) = start(r, "negotiate");
        let mut c = client(&srv);
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
        // Before structured replies: LIST works, SET is invalid.
        assert_eq!(c.meta_context(opt::LIST_META_CONTEXT, "disk", &[]), [(0, "base:allocation".to_string())]);
        c.option(opt::SET_META_CONTEXT, &meta_data("disk", &["base:allocation"]));
        assert_eq!(c.opt_reply().kind, rep::ERR_INVALID);
        // STRUCTURED_REPLY with data is invalid; without, acknowledged.
        c.option(opt::STRUCTURED_REPLY, b"x");
        assert_eq!(c.opt_reply().kind, rep::ERR_INVALID);
        c.option(opt::STRUCTURED_REPLY, &[]);
        assert_eq!(c.opt_reply().kind, rep::ACK);
        // LIST: "base:" is a wildcard, unknown namespaces and leaves match nothing.
        assert_eq!(c.meta_context(opt::LIST_META_CONTEXT, "", &["base:"]).len(), 1);
        assert_eq!(c.meta_context(opt::LIST_META_CONTEXT, "disk", &["qemu:dirty-bitmap:b", "base:other"]), []);
        // SET: exact names only; an unknown export or malformed data is refused.
        assert_eq!(c.meta_context(opt::SET_META_CONTEXT, "disk", &["base:"]), []);
        c.option(opt::SET_META_CONTEXT, &meta_data("other", &["base:allocation"]));
        assert_eq!(c.opt_reply().kind, rep::ERR_UNKNOWN);
        let mut bad = meta_data("disk", &["base:allocation"]);
        bad.pop();
        c.option(opt::SET_META_CONTEXT, &bad);
        assert_eq!(c.opt_reply().kind, rep::ERR_INVALID);
        let mut many = meta_data("disk", &[]);
        let n = many.len();
        many[n - 4..].copy_from_slice(&100_000u32.to_be_bytes());
        c.option(opt::LIST_META_CONTEXT, &many);
        assert_eq!(c.opt_reply().kind, rep::ERR_TOO_BIG);
        // The last SET counts: it selected nothing, so BLOCK_STATUS is refused.
        let v = c.info_or_go(opt::GO, "disk", &[]);
        assert_eq!(v.last().unwrap().kind, rep::ACK);
        let flags = u16::from_be_bytes(v[0].data[10..12].try_into().unwrap());
        for f in [tflag::SEND_DF, tflag::SEND_CACHE, tflag::CAN_MULTI_CONN] {
            assert_ne!(flags & f, 0, "flag {f:#x} in {flags:#x}");
        }
        assert_eq!(c.block_status(0, 1, 0, 4096), Err(err::EINVAL));
        // Other commands keep simple replies.
        assert_eq!(c.simple(0, cmd::FLUSH, 2, 0, 0), 0);
        drop(c);
        // Without structured replies, BLOCK_STATUS and DF are invalid, with simple replies.
        let mut c = client(&srv);
        c.go("disk");
        assert_eq!(c.simple(0, cmd::BLOCK_STATUS, 3, 0, 4096), err::EINVAL);
        assert_eq!(c.read(4, 0, 0), (0, Vec::new()));
        c.request(cflag::DF, cmd::READ, 5, 0, 4096);
        assert_eq!(c.reply(), (err::EINVAL, 5));
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn reads_come_as_data_and_hole_chunks(r: &Reactor) {
        let (srv, path) = start(r, "read");
        let mut c = client(&srv);
        let (size, _) = c.structured_go("disk", false);
        assert_eq!(size, SIZE);
        let file = std::fs::read(&path).unwrap();
        // The whole export: its holes come as hole chunks, each at most 32 bytes on the wire.
        let (e, data, chunks) = c.read_chunks(0, 1, 0, SIZE as u32);
        assert_eq!(e, 0);
        assert!(data == file, "the chunks rebuild the file");
        let kinds: Vec<u16> = chunks.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [kind::OFFSET_HOLE, kind::OFFSET_DATA, kind::OFFSET_HOLE, kind::OFFSET_DATA, kind::OFFSET_HOLE, kind::OFFSET_DATA]);
        let done: Vec<bool> = chunks.iter().map(|c| c.flags & FLAG_DONE != 0).collect();
        assert_eq!(done, [false, false, false, false, false, true], "only the last chunk is done");
        // Don't-fragment: one data chunk, holes as zeros.
        let (e, data, chunks) = c.read_chunks(cflag::DF, 2, 0, 1 << 20);
        assert_eq!((e, chunks.len(), chunks[0].kind), (0, 1, kind::OFFSET_DATA));
        assert!(data[..] == file[..1 << 20]);
        // A short read is one data chunk even across a hole.
        let (e, data, chunks) = c.read_chunks(0, 3, 120 * K, 16 * K as u32);
        assert_eq!((e, chunks.len()), (0, 1));
        assert!(data[..] == file[120 * K as usize..136 * K as usize]);
        // Errors are error chunks, data-less: bad flags, past the end, too long.
        for (flags, at, len) in [(1 << 9, 0, 4096), (0, SIZE - 4096, 8192), (0, 0, (32 << 20) + 1)] {
            let (e, _, chunks) = c.read_chunks(flags, 4, at, len);
            assert_eq!((e, chunks.len()), (err::EINVAL, 1), "flags {flags:#x} at {at} len {len}");
            assert_eq!(chunks[0].flags, FLAG_DONE);
        }
        // A zero-length READ succeeds with one final NONE chunk.
        c.request(0, cmd::READ, 5, 0, 0);
        let chunks = c.chunks(5);
        assert_eq!((chunks.len(), chunks[0].kind, chunks[0].payload.len()), (1, kind::NONE, 0));
        // Writes still get simple replies, and what they write reads back as data.
        assert_eq!(c.write(0, 6, 0, &[9u8; 4096]), 0);
        let (_, data, chunks) = c.read_chunks(0, 7, 0, 128 * K as u32);
        assert!(data[..4096].iter().all(|&b| b == 9));
        assert_eq!(chunks[0].kind, kind::OFFSET_DATA);
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn block_status_reports_holes_and_data(r: &Reactor) {
        let (srv, path) = start(r, "status");
        let mut c = client(&srv);
        c.structured_go("disk", true);
        assert_eq!(c.block_status(0, 1, 0, SIZE), Ok(expected_map(0, SIZE)));
        // A range starting and ending inside extents is cut to it.
        assert_eq!(c.block_status(0, 2, 100 * K, 1000 * K), Ok(expected_map(100 * K, 1100 * K)));
        // REQ_ONE: one descriptor, never past the request.
        assert_eq!(c.block_status(cflag::REQ_ONE, 3, 0, 4096), Ok(vec![(4096, state::HOLE | state::ZERO)]));
        assert_eq!(c.block_status(cflag::REQ_ONE, 4, 64 * K, SIZE - 64 * K), Ok(vec![(64 * K, 0)]));
        // Refused: past the end, zero length, unknown flags.
        assert_eq!(c.block_status(0, 5, SIZE - 512, 1024), Err(err::EINVAL));
        assert_eq!(c.block_status(0, 6, 0, 0), Err(err::EINVAL));
        assert_eq!(c.block_status(cflag::NO_HOLE, 7, 0, 512), Err(err::EINVAL));
        assert_eq!(c.block_status(cflag::FUA | cflag::REQ_ONE, 7, 0, 512), Ok(vec![(512, state::HOLE | state::ZERO)]));
        // A TRIM makes a hole that block status then reports; a write fills one.
        assert_eq!(c.simple(0, cmd::TRIM, 8, 1024 * K, 200 * K as u32), 0);
        assert_eq!(c.write(0, 9, 2048 * K, &[5u8; 4096]), 0);
        let map = c.block_status(0, 10, 1024 * K, 2048 * K).unwrap();
        let hole = state::HOLE | state::ZERO;
        assert_eq!(map, [(1024 * K, hole), (4096, 0), (1020 * K, hole)]);
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn extended_headers_carry_64_bit_lengths_and_every_reply_is_a_chunk(r: &Reactor) {
        let (srv, path) = start(r, "extended");
        let mut c = client(&srv);
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
        c.option(opt::EXTENDED_HEADERS, b"x");
        assert_eq!(c.opt_reply().kind, rep::ERR_INVALID, "no data allowed");
        c.option(opt::EXTENDED_HEADERS, &[]);
        assert_eq!(c.opt_reply().kind, rep::ACK);
        c.option(opt::EXTENDED_HEADERS, &[]);
        assert_eq!(c.opt_reply().kind, rep::ERR_INVALID, "negotiated already");
        c.option(opt::STRUCTURED_REPLY, &[]);
        assert_eq!(c.opt_reply().kind, rep::ERR_EXT_HEADER_REQD);
        assert_eq!(c.meta_context(opt::SET_META_CONTEXT, "disk", &["base:allocation"]).len(), 1);
        let v = c.info_or_go(opt::GO, "disk", &[]);
        assert_eq!(v.last().unwrap().kind, rep::ACK);
        c.extended = true;
        let file = std::fs::read(&path).unwrap();
        // READ: data and hole chunks, each repeating the request's offset.
        let (e, data, chunks) = c.read_chunks(0, 1, 0, SIZE as u32);
        assert_eq!((e, chunks.len()), (0, 6));
        assert!(data == file);
        // BLOCK_STATUS_EXT: 64-bit descriptors with their count.
        assert_eq!(c.block_status(0, 8, 0, SIZE), Ok(expected_map(0, SIZE)));
        // Every other reply is a chunk too: NONE for success, an error chunk otherwise.
        assert_eq!(c.write(cflag::FUA, 2, 8192, &[3u8; 512]), 0);
        assert_eq!(c.simple(0, cmd::FLUSH, 3, 0, 0), 0);
        assert_eq!(c.simple(0, cmd::CACHE, 4, 0, SIZE as u32), 0);
        assert_eq!(c.simple(0, cmd::TRIM, 5, SIZE - 4096, 8192), err::EINVAL);
        // 64-bit effect lengths: past the end is refused, not truncated.
        c.request64(0, cmd::WRITE_ZEROES, 6, 0, 1 << 33);
        assert_eq!(c.reply(), (err::ENOSPC, 6));
        assert_eq!(c.block_status(0, 7, 0, 1 << 33), Err(err::EINVAL));
        // A WRITE's length is its payload's, flagged or not (QEMU's client does not flag it).
        c.request(0, cmd::WRITE, 9, 8192, 512);
        c.send(&[4u8; 512]);
        assert_eq!(c.reply(), (0, 9));
        // A payload where none belongs is read past and refused; the stream stays in step.
        c.request(cflag::PAYLOAD_LEN, cmd::READ, 10, 0, 100);
        c.send(&[0u8; 100]);
        assert_eq!(c.reply(), (err::EINVAL, 10));
        let (e, data, _) = c.read_chunks(0, 11, 8192, 512);
        assert_eq!((e, data), (0, vec![4u8; 512]));
        // A payload over 32 MiB ends the connection.
        c.request64(cflag::PAYLOAD_LEN, cmd::WRITE, 12, 0, (32 << 20) + 1);
        assert!(c.closed_by_server());
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn cache_reads_ahead_and_checks_its_request(r: &Reactor) {
        let (srv, path) = start(r, "cache");
        let mut c = client(&srv);
        c.go("disk");
        assert_eq!(c.simple(0, cmd::CACHE, 1, 0, SIZE as u32), 0);
        assert_eq!(c.simple(0, cmd::CACHE, 1, 0, 1 << 20), 0);
        assert_eq!(c.simple(0, cmd::CACHE, 2, 0, 0), 0);
        assert_eq!(c.simple(cflag::FUA, cmd::CACHE, 3, 0, 4096), 0, "FUA is valid on every command");
        assert_eq!(c.simple(cflag::NO_HOLE, cmd::CACHE, 3, 0, 4096), err::EINVAL, "other flags are not");
        assert_eq!(c.simple(0, cmd::CACHE, 3, 0, (32 << 20) + 1), err::EINVAL, "past the end (and over 32 MiB)");
        assert_eq!(c.simple(0, cmd::CACHE, 4, SIZE, 1), err::EINVAL, "past the end");
        // The data is what it was: CACHE is only a hint.
        let (e, data) = c.read(5, 64 * K, 4096);
        assert_eq!((e, data), (0, content(64 * K, 4096)));
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn cache_brings_a_whole_32_mib_range_into_the_page_cache(r: &Reactor) {
        // One WILLNEED call reads ahead only about the device's read-ahead window (8 MiB
        // here); the server advises in pieces, so all of it comes in.
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("nbd-cache32-{}-{}.img", r.backend(), std::process::id()));
        std::fs::write(&path, vec![0x42u8; 32 << 20]).unwrap();
        let mut cfg = Config::new(&path);
        cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
        cfg.backend = r.backend();
        let srv = Server::start(cfg).unwrap();
        let mut c = client(&srv);
        c.go("");
        drop_cache(&path);
        assert!(resident_pages(&path) < 1024, "the file's pages were dropped");
        assert_eq!(c.simple(0, cmd::CACHE, 1, 0, 32 << 20), 0);
        // All 8192 pages normally arrive; read-ahead is best effort, so under a loaded disk
        // the test asks for three quarters: one call would bring one window (2048 pages).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while resident_pages(&path) < 6144 {
            let n = resident_pages(&path);
            assert!(std::time::Instant::now() < deadline, "CACHE read the range ahead: {n} of 8192 pages");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn every_connection_sees_one_file(r: &Reactor) {
        // NBD_FLAG_CAN_MULTI_CONN: a write acknowledged on one connection is read back by
        // another, and a FLUSH on any connection makes it durable (one fdatasync of the one
        // file covers every connection's acknowledged writes).
        let (srv, path) = start(r, "multi-conn");
        let mut a = client(&srv);
        let mut b = client(&srv);
        let (_, flags) = a.go("disk");
        assert_ne!(flags & tflag::CAN_MULTI_CONN, 0);
        b.structured_go("disk", true);
        assert_eq!(a.write(0, 1, 3 * 1024 * K, &[0x42; 8192]), 0);
        let (e, data, _) = b.read_chunks(0, 1, 3 * 1024 * K, 8192);
        assert_eq!(e, 0);
        assert!(data.iter().all(|&x| x == 0x42), "b reads what a wrote");
        assert_eq!(b.block_status(cflag::REQ_ONE, 2, 3 * 1024 * K, 8192), Ok(vec![(8192, 0)]));
        let syncs = srv.stats().syncs;
        assert_eq!(b.simple(0, cmd::FLUSH, 3, 0, 0), 0);
        assert_eq!(srv.stats().syncs, syncs + 1);
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }
}
