//! The server against a raw client, on both backends: negotiation, every command, the
//! errors the protocol asks for, misbehaving clients, concurrency.

mod common;

use std::path::PathBuf;

use common::*;
use nbd_server::{Config, Server};
use tests::backend_tests;

const SIZE: usize = 4 << 20;

fn start(r: &tests::Reactor, tag: &str, read_only: bool) -> (Server, PathBuf) {
    let path = scratch_file(&format!("{tag}-{}", r.backend()), SIZE);
    let mut cfg = Config::new(&path);
    cfg.export_name = "disk".into();
    cfg.description = "a test disk".into();
    cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
    cfg.backend = r.backend();
    cfg.read_only = read_only;
    (Server::start(cfg).expect("start the server"), path)
}

fn client(s: &Server) -> Client {
    Client::connect(s.tcp_addr().unwrap())
}

/// A connected client in transmission.
fn session(s: &Server) -> Client {
    let mut c = client(s);
    let (size, _) = c.go("disk");
    assert_eq!(size, SIZE as u64);
    c
}

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

backend_tests! {
    fn negotiation_options(r: &Reactor) {
        let (srv, path) = start(r, "negotiation", false);
        let mut c = client(&srv);
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
        // LIST: the export with its description, then ACK; with data it is invalid.
        c.option(opt::LIST, &[]);
        let item = c.opt_reply();
        assert_eq!(item.kind, rep::SERVER);
        assert_eq!(&item.data[..4], &4u32.to_be_bytes());
        assert_eq!(&item.data[4..], b"diska test disk");
        assert_eq!(c.opt_reply().kind, rep::ACK);
        c.option(opt::LIST, b"junk");
        assert_eq!(c.opt_reply().kind, rep::ERR_INVALID);
        // INFO: unknown export; the export with what was asked; malformed data.
        let v = c.info_or_go(opt::INFO, "nope", &[]);
        assert_eq!((v.len(), v[0].kind), (1, rep::ERR_UNKNOWN));
        let v = c.info_or_go(opt::INFO, "disk", &[info::BLOCK_SIZE, info::NAME, info::DESCRIPTION, 999]);
        let kinds: Vec<(u32, u16)> = v.iter().map(|r| (r.kind, r.data.get(..2).map_or(u16::MAX, |b| u16::from_be_bytes([b[0], b[1]])))).collect();
        assert_eq!(kinds, [(rep::INFO, info::EXPORT), (rep::INFO, info::BLOCK_SIZE), (rep::INFO, info::NAME), (rep::INFO, info::DESCRIPTION), (rep::ACK, u16::MAX)]);
        assert_eq!(u64::from_be_bytes(v[0].data[2..10].try_into().unwrap()), SIZE as u64);
        let flags = u16::from_be_bytes(v[0].data[10..12].try_into().unwrap());
        for f in [tflag::HAS_FLAGS, tflag::SEND_FLUSH, tflag::SEND_FUA, tflag::SEND_TRIM, tflag::SEND_WRITE_ZEROES, tflag::CAN_MULTI_CONN, tflag::SEND_CACHE] {
            assert_ne!(flags & f, 0, "flag {f:#x} in {flags:#x}");
        }
        assert_eq!(flags & tflag::READ_ONLY, 0);
        assert_eq!(flags & tflag::SEND_DF, 0, "DF only with structured replies");
        assert_eq!(&v[1].data[2..], [&1u32.to_be_bytes()[..], &4096u32.to_be_bytes(), &(32u32 << 20).to_be_bytes()].concat());
        assert_eq!(&v[2].data[2..], b"disk");
        assert_eq!(&v[3].data[2..], b"a test disk");
        c.option(opt::INFO, &[0, 0, 0, 4, b'd']);
        assert_eq!(c.opt_reply().kind, rep::ERR_INVALID);
        // Refused: TLS (off by default: the server's policy), anything unknown. Each
        // refusal leaves the negotiation usable.
        for (o, kind) in [(opt::STARTTLS, rep::ERR_POLICY), (12, rep::ERR_UNSUP), (4242, rep::ERR_UNSUP)] {
            c.option(o, &[]);
            let r = c.opt_reply();
            assert_eq!((r.option, r.kind), (o, kind), "option {o}");
        }
        // An info request repeated (here 30,000 times, the most 64 KiB of option data holds)
        // is answered once: a client cannot make the server build megabytes of replies.
        let many: Vec<u16> = std::iter::repeat_n([info::NAME, info::DESCRIPTION, info::BLOCK_SIZE], 10_000).flatten().collect();
        let v = c.info_or_go(opt::INFO, "disk", &many);
        assert_eq!(v.len(), 5, "EXPORT, NAME, DESCRIPTION, BLOCK_SIZE once each, then ACK");
        // The default export answers to "" too; INFO does not enter transmission.
        let v = c.info_or_go(opt::INFO, "", &[]);
        assert_eq!(v.last().unwrap().kind, rep::ACK);
        // ABORT: ACK, then the server closes.
        c.option(opt::ABORT, &[]);
        assert_eq!(c.opt_reply().kind, rep::ACK);
        assert!(c.closed_by_server());
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn export_name_the_old_way(r: &Reactor) {
        let (srv, path) = start(r, "export-name", false);
        // Without NO_ZEROES: size, flags and 124 zero bytes.
        let mut c = client(&srv);
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
        c.option(opt::EXPORT_NAME, b"disk");
        let m = c.recv(134);
        assert_eq!(u64::from_be_bytes(m[0..8].try_into().unwrap()), SIZE as u64);
        assert!(m[10..].iter().all(|&b| b == 0));
        let (e, data) = c.read(1, 0, 8);
        assert_eq!((e, data), (0, initial(0, 8)));
        // With NO_ZEROES: 10 bytes, then transmission.
        let mut c = client(&srv);
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        c.option(opt::EXPORT_NAME, b"");
        c.recv(10);
        assert_eq!(c.read(2, 4096, 16).0, 0);
        // An unknown name cannot be refused with a reply: the server closes.
        let mut c = client(&srv);
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
        c.option(opt::EXPORT_NAME, b"other");
        assert!(c.closed_by_server());
        // Unknown client flags, and a bad option magic, close too.
        let mut c = client(&srv);
        c.handshake(1 << 7);
        assert!(c.closed_by_server());
        let mut c = client(&srv);
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
        c.send(&[0u8; 16]);
        assert!(c.closed_by_server());
        // An absurdly long option is not read into memory: the server closes.
        let mut c = client(&srv);
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
        let mut m = proto::IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt::GO.to_be_bytes());
        m.extend_from_slice(&u32::MAX.to_be_bytes());
        c.send(&m);
        assert!(c.closed_by_server());
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn every_command_round_trips(r: &Reactor) {
        let (srv, path) = start(r, "commands", false);
        let mut c = session(&srv);
        let data = pattern(7, 64 * 1024);
        assert_eq!(c.write(0, 1, 8192, &data), 0);
        assert_eq!(c.read(2, 8192, data.len() as u32), (0, data.clone()));
        let syncs = srv.stats().syncs;
        assert_eq!(c.write(cflag::FUA, 3, 0, b"forced unit access"), 0);
        assert_eq!(srv.stats().syncs, syncs + 1, "FUA syncs before the reply");
        assert_eq!(c.simple(0, cmd::FLUSH, 4, 0, 0), 0);
        assert_eq!(srv.stats().syncs, syncs + 2, "FLUSH syncs");
        // TRIM and WRITE_ZEROES (hole, allocated, fast) read back as zeros.
        assert_eq!(c.simple(0, cmd::TRIM, 5, 8192, 4096), 0);
        assert_eq!(c.simple(0, cmd::WRITE_ZEROES, 6, 12288, 4096), 0);
        assert_eq!(c.simple(cflag::NO_HOLE, cmd::WRITE_ZEROES, 7, 16384, 4096), 0);
        let fast = c.simple(cflag::FAST_ZERO | cflag::FUA, cmd::WRITE_ZEROES, 8, 20480, 4096);
        assert!(fast == 0 || fast == err::ENOTSUP, "fast zero: {fast}");
        let (e, back) = c.read(9, 8192, 4 * 4096);
        assert_eq!(e, 0);
        assert!(back[..3 * 4096].iter().all(|&b| b == 0), "trimmed and zeroed ranges read as zeros");
        if fast == 0 {
            assert!(back[3 * 4096..].iter().all(|&b| b == 0), "a fast zero that succeeded zeroed");
        } else {
            assert_eq!(back[3 * 4096..], initial(20480, 4096), "a refused fast zero changed nothing");
        }
        // Zero-length requests succeed and do nothing.
        assert_eq!(c.read(10, 0, 0), (0, Vec::new()));
        assert_eq!(c.write(0, 11, SIZE as u64, &[]), 0);
        assert_eq!(c.simple(0, cmd::TRIM, 12, 0, 0), 0);
        // DISC: the server closes after it.
        c.request(0, cmd::DISC, 13, 0, 0);
        assert!(c.closed_by_server());
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[..18], b"forced unit access");
        assert_eq!(&file[8192 + 4 * 4096..8192 + data.len()], &data[4 * 4096..]);
        let st = srv.stats();
        assert_eq!((st.connections, st.requests), (1, 13));
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn errors_the_protocol_specifies(r: &Reactor) {
        let (srv, path) = start(r, "errors", false);
        let mut c = session(&srv);
        let end = SIZE as u64;
        // Past the end: READ/TRIM EINVAL, WRITE/WRITE_ZEROES ENOSPC; an offset that
        // overflows; the WRITE payload is consumed (the next request parses).
        assert_eq!(c.read(1, end - 10, 20).0, err::EINVAL);
        assert_eq!(c.write(0, 2, end - 10, &[1u8; 20]), err::ENOSPC);
        assert_eq!(c.simple(0, cmd::TRIM, 3, end, 1), err::EINVAL);
        assert_eq!(c.simple(0, cmd::WRITE_ZEROES, 4, end - 1, 2), err::ENOSPC);
        assert_eq!(c.read(5, u64::MAX - 1, 4).0, err::EINVAL);
        // Unknown command, unknown or misplaced flags (payload still consumed).
        assert_eq!(c.simple(0, 99, 6, 0, 4096), err::EINVAL);
        assert_eq!(c.simple(0, 7, 7, 0, 4096), err::EINVAL, "BLOCK_STATUS needs structured replies");
        c.request(1 << 9, cmd::READ, 8, 0, 16);
        assert_eq!(c.reply(), (err::EINVAL, 8));
        assert_eq!(c.write(cflag::NO_HOLE, 9, 0, &[2u8; 100]), err::EINVAL);
        assert_eq!(c.simple(cflag::FAST_ZERO, cmd::TRIM, 10, 0, 4096), err::EINVAL);
        // A READ over the 32 MiB maximum.
        assert_eq!(c.read(11, 0, (32 << 20) + 1).0, err::EINVAL);
        // FUA on a READ is accepted (the flag is advertised).
        c.request(cflag::FUA, cmd::READ, 12, 0, 4);
        assert_eq!(c.reply(), (0, 12));
        c.recv(4);
        // After all that the connection still works and nothing was written.
        assert_eq!(c.read(13, 0, 4096).1, initial(0, 4096));
        assert_eq!(c.read(14, end - 4096, 4096).1, initial(end - 4096, 4096), "the refused tail write");
        let st = srv.stats();
        assert!(st.errors >= 11, "{st:?}");
        drop(c);
        drop(srv);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file[..4096], initial(0, 4096), "a refused write wrote nothing");
        assert_eq!(file[SIZE - 4096..], initial(end - 4096, 4096), "a write past the end wrote nothing");
        std::fs::remove_file(path).unwrap();
    }

    fn read_only_export(r: &Reactor) {
        let (srv, path) = start(r, "read-only", true);
        let mut c = client(&srv);
        let (_, flags) = c.go("disk");
        assert_ne!(flags & tflag::READ_ONLY, 0);
        assert_eq!(c.write(0, 1, 0, &[9u8; 4096]), err::EPERM);
        assert_eq!(c.simple(0, cmd::TRIM, 2, 0, 4096), err::EPERM);
        assert_eq!(c.simple(0, cmd::WRITE_ZEROES, 3, 0, 4096), err::EPERM);
        assert_eq!(c.simple(0, cmd::FLUSH, 4, 0, 0), 0);
        assert_eq!(c.read(5, 0, 4096), (0, initial(0, 4096)));
        assert_eq!(std::fs::read(&path).unwrap()[..4096], initial(0, 4096));
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn a_broken_client_does_not_disturb_the_others(r: &Reactor) {
        let (srv, path) = start(r, "broken", false);
        let mut good = session(&srv);
        // Bad request magic: that connection closes.
        let mut bad = session(&srv);
        bad.send(&[0xffu8; 28]);
        assert!(bad.closed_by_server());
        // A WRITE announcing more than 32 MiB: closed, nothing read into memory.
        let mut big = session(&srv);
        big.request(0, cmd::WRITE, 1, 0, u32::MAX);
        assert!(big.closed_by_server());
        // A client that leaves in the middle of a WRITE payload, and one that leaves with
        // reads in flight.
        let mut half = session(&srv);
        half.request(0, cmd::WRITE, 1, 0, 8192);
        half.send(&[3u8; 1000]);
        drop(half);
        let mut gone = session(&srv);
        for h in 0..64 {
            gone.request(0, cmd::READ, h, h * 4096, 4096);
        }
        drop(gone);
        // The good client saw none of it.
        for i in 0..20u64 {
            let d = pattern(i as u8, 4096);
            assert_eq!(good.write(0, i, 65536 + i * 4096, &d), 0);
            assert_eq!(good.read(100 + i, 65536 + i * 4096, 4096), (0, d));
        }
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file[..8192], initial(0, 8192), "a partial payload is never written");
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn a_client_that_stops_reading_is_disconnected_after_the_idle_timeout(r: &Reactor) {
        let path = scratch_file(&format!("idle-{}", r.backend()), SIZE);
        let mut cfg = Config::new(&path);
        cfg.export_name = "disk".into();
        cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
        cfg.backend = r.backend();
        cfg.idle_timeout = Some(std::time::Duration::from_secs(1));
        cfg.max_memory = nbd_server::MIN_MAX_MEMORY;
        let srv = Server::start(cfg).unwrap();
        // 32 READs of 4 MiB, never read: far more than the socket buffers hold.
        let mut stalled = session(&srv);
        for h in 0..32 {
            stalled.request(0, cmd::READ, h, 0, SIZE as u32);
        }
        let t0 = std::time::Instant::now();
        while srv.memory_in_use() < 32 << 20 {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10), "not admitted");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(srv.memory_in_use() <= nbd_server::MIN_MAX_MEMORY, "within the budget");
        // Cut off after the idle timeout (1 s without reading): what it holds goes back.
        std::thread::sleep(std::time::Duration::from_millis(2500));
        assert!(stalled.closed_by_server(), "what was sent, then the end");
        let mut other = session(&srv);
        assert_eq!(other.read(1000, 0, 4096), (0, initial(0, 4096)));
        while srv.memory_in_use() > 0 {
            assert!(t0.elapsed() < std::time::Duration::from_secs(20), "budget not given back");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn connections_over_the_limit_are_closed_at_once(r: &Reactor) {
        let path = scratch_file(&format!("maxconn-{}", r.backend()), SIZE);
        let mut cfg = Config::new(&path);
        cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
        cfg.backend = r.backend();
        cfg.max_connections = Some(2);
        let srv = Server::start(cfg).unwrap();
        let mut a = client(&srv);
        a.go("");
        let mut b = client(&srv);
        b.go("");
        let mut c = client(&srv);
        assert!(c.closed_by_server(), "the third is closed without a greeting");
        assert_eq!(b.read(1, 0, 512), (0, initial(0, 512)));
        // A slot frees when a connection ends.
        drop(a);
        let t0 = std::time::Instant::now();
        let mut d = loop {
            let mut d = client(&srv);
            let mut greeting = [0u8; 18];
            if std::io::Read::read_exact(&mut d.s, &mut greeting).is_ok() {
                d.send(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes());
                break d;
            }
            assert!(t0.elapsed() < std::time::Duration::from_secs(5), "the slot never freed");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let replies = d.info_or_go(opt::GO, "", &[]);
        assert_eq!(replies.last().unwrap().kind, rep::ACK);
        assert_eq!(d.read(2, 0, 512), (0, initial(0, 512)));
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn many_requests_in_flight_and_disc_finishes_them(r: &Reactor) {
        let (srv, path) = start(r, "inflight", false);
        let mut c = session(&srv);
        // 256 requests sent before any reply is read: writes to even blocks, reads of odd
        // ones; replies may come in any order.
        let mut expect = std::collections::HashMap::new();
        let mut out = Vec::new();
        for h in 0..256u64 {
            let off = h * 8192;
            if h % 2 == 0 {
                let d = pattern(h as u8, 4096);
                out.extend_from_slice(&proto::Request { flags: 0, kind: cmd::WRITE, handle: h, offset: off, length: 4096 }.encode());
                out.extend_from_slice(&d);
                expect.insert(h, None);
            } else {
                out.extend_from_slice(&proto::Request { flags: 0, kind: cmd::READ, handle: h, offset: off, length: 4096 }.encode());
                expect.insert(h, Some(initial(off, 4096)));
            }
        }
        // DISC right behind them: the server must still answer all 256 first.
        out.extend_from_slice(&proto::Request { flags: 0, kind: cmd::DISC, handle: 999, offset: 0, length: 0 }.encode());
        let writer = {
            let mut s = c.s.try_clone().unwrap();
            std::thread::spawn(move || std::io::Write::write_all(&mut s, &out).unwrap())
        };
        for _ in 0..256 {
            let (e, h) = c.reply();
            assert_eq!(e, 0, "handle {h}");
            let read = expect.remove(&h).unwrap_or_else(|| panic!("unknown or repeated handle {h}"));
            if let Some(data) = read {
                assert_eq!(c.recv(4096), data, "read {h}");
            }
        }
        writer.join().unwrap();
        assert!(expect.is_empty());
        assert!(c.closed_by_server());
        let file = std::fs::read(&path).unwrap();
        for h in (0..256u64).step_by(2) {
            let off = (h * 8192) as usize;
            assert_eq!(&file[off..off + 4096], &pattern(h as u8, 4096)[..], "write {h}");
        }
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn requests_that_need_not_wait_are_served_without_a_task_of_their_own(r: &Reactor) {
        let (srv, path) = start(r, "atonce", false);
        let _ = std::fs::read(&path).unwrap(); // all of it in the page cache
        let mut c = session(&srv);
        for h in 0..100u64 {
            let (e, data) = c.read(h, h * 4096, 4096);
            assert_eq!((e, data), (0, initial(h * 4096, 4096)));
        }
        // 32 in one send: each is served as it is read, the replies go out together.
        read_burst(&mut c, 8192);
        assert_eq!(srv.stats().requests_waited, 0, "cached reads need no task: {:?}", srv.stats());
        // A FLUSH waits for the device: a task of its own, and the connection reads on.
        assert_eq!(c.simple(0, cmd::FLUSH, 1000, 0, 0), 0);
        assert_eq!(srv.stats().requests_waited, 1, "{:?}", srv.stats());
        // A request that does some of its work in the reader and then waits goes on as a
        // task and finishes there: a FUA WRITE (an inline write, then the sync), and a READ
        // that finds the reader's I/O budget spent.
        let data = pattern(7, 8192);
        assert_eq!(c.write(cflag::FUA, 1001, 8192, &data), 0);
        assert_eq!(srv.stats().requests_waited, 2, "{:?}", srv.stats());
        // Two in one send: the first spends 68 units (its last piece starts with 51 spent),
        // so the second meets the budget spent at its first piece.
        let mut out = Vec::new();
        for h in [1002u64, 1003] {
            out.extend_from_slice(&proto::Request { flags: 0, kind: cmd::READ, handle: h, offset: 0, length: SIZE as u64 }.encode());
        }
        c.send(&out);
        for _ in 0..2 {
            let (e, h) = c.reply();
            assert_eq!(e, 0, "read {h}");
            let all = c.recv(SIZE);
            assert_eq!(&all[8192..16384], &data[..], "the FUA write, read {h}");
            assert_eq!(&all[16384..], &initial(16384, SIZE - 16384)[..], "read {h}");
        }
        assert_eq!(srv.stats().requests_waited, 3, "{:?}", srv.stats());
        // So does a READ of data the page cache dropped. (Readahead from the READs above may
        // still be landing: drop until none of the file is cached, as on a busy machine it
        // can land after the first drop.)
        for _ in 0..200 {
            drop_cache(&path);
            if resident_pages(&path) == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(resident_pages(&path), 0, "the file's pages could not be dropped");
        let (e, data) = c.read(1004, 512 * 1024, 4096);
        assert_eq!((e, data), (0, initial(512 * 1024, 4096)));
        // On io_uring its completion comes with a later wait: the request always waits. On
        // epoll the read goes to a pool thread, which on a busy machine may be done before
        // the reader (preempted meanwhile) first polls the request: then it did not wait.
        let waited = srv.stats().requests_waited;
        match r.backend() {
            tests::Backend::Uring => assert_eq!(waited, 4, "{:?}", srv.stats()),
            _ => assert!((3..=4).contains(&waited), "{:?}", srv.stats()),
        }
        drop(c);
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn a_client_with_a_deep_queue_pauses_polling_and_a_shallow_one_does_not(r: &Reactor) {
        let (srv, path) = start(r, "pollpause", false);
        let mut c = session(&srv);
        // Queue depth 1: a request, its reply, then the next.
        for h in 0..100u64 {
            let (e, data) = c.read(h, h * 4096, 4096);
            assert_eq!((e, data), (0, initial(h * 4096, 4096)));
        }
        assert_eq!(srv.stats().polling_pauses, 0, "queue depth 1 keeps the IoThread polling");
        // 32 reads in one send: the server finds them in flight together.
        let burst = |c: &mut Client| read_burst(c, 4096);
        burst(&mut c);
        assert_eq!(srv.stats().polling_pauses, 1, "32 in flight stop the polling once");
        burst(&mut c);
        assert_eq!(srv.stats().polling_pauses, 1, "still paused");
        // Enough requests at depth 1 and it polls again, so the next burst pauses it again.
        for h in 0..nbd_server::POLL_CALM as u64 {
            assert_eq!(c.read(h, h * 4096, 4096).0, 0);
        }
        burst(&mut c);
        assert_eq!(srv.stats().polling_pauses, 2, "polling came back and paused again");
        drop(c);
        drop(srv);
        // With depth 0 the IoThreads poll at any depth.
        let mut cfg = Config::new(&path);
        cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
        cfg.backend = r.backend();
        cfg.poll_depth = 0;
        let srv = Server::start(cfg).unwrap();
        let mut c = client(&srv);
        c.go("");
        burst(&mut c);
        assert_eq!(srv.stats().polling_pauses, 0);
        drop(c);
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn a_client_that_never_reads_replies_is_throttled(r: &Reactor) {
        let (srv, path) = start(r, "throttle", false);
        let c = session(&srv);
        // Requests that each get an error reply, sent without ever reading a reply: the
        // server must stop reading (its queue of replies is bounded), so the sender blocks.
        let junk: Vec<u8> = (0..1000u64)
            .flat_map(|h| proto::Request { flags: 0, kind: 99, handle: h, offset: 0, length: 0 }.encode())
            .collect();
        let mut s = c.s.try_clone().unwrap();
        s.set_write_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let mut sent = 0u64;
        let blocked = loop {
            match std::io::Write::write_all(&mut s, &junk) {
                Ok(()) => sent += 1000,
                Err(e) => break e,
            }
            assert!(sent < 20_000_000, "the server kept reading: its memory is not bounded");
        };
        assert!(
            matches!(blocked.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "{blocked}"
        );
        drop(s);
        drop(c);
        // Everyone else is served.
        let mut other = session(&srv);
        assert_eq!(other.read(1, 0, 512), (0, initial(0, 512)));
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn the_handshake_has_a_time_limit(r: &Reactor) {
        let path = scratch_file(&format!("limit-{}", r.backend()), SIZE);
        let mut cfg = Config::new(&path);
        cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
        cfg.backend = r.backend();
        cfg.handshake_limit = Some(std::time::Duration::from_millis(200));
        let srv = Server::start(cfg).unwrap();
        // Silent after connecting: disconnected once the limit passes.
        let t0 = std::time::Instant::now();
        let mut idle = client(&srv);
        assert!(idle.closed_by_server());
        assert!(t0.elapsed() >= std::time::Duration::from_millis(190), "{:?}", t0.elapsed());
        // The limit is on negotiation only: a session may then stay idle.
        let mut c = client(&srv);
        c.go("");
        std::thread::sleep(std::time::Duration::from_millis(400));
        assert_eq!(c.read(1, 0, 512), (0, initial(0, 512)));
        drop(srv);
        std::fs::remove_file(path).unwrap();
    }

    fn shutdown_answers_what_is_in_flight(r: &Reactor) {
        let (srv, path) = start(r, "shutdown", false);
        let mut c = session(&srv);
        // FUA writes (each waits for fdatasync) sent back to back, so that several are in
        // flight when the shutdown comes.
        let mut out = Vec::new();
        for h in 0..64u64 {
            out.extend_from_slice(&proto::Request { flags: cflag::FUA, kind: cmd::WRITE, handle: h, offset: h * 4096, length: 4096 }.encode());
            out.extend_from_slice(&pattern(h as u8, 4096));
        }
        c.send(&out);
        let (e, first) = c.reply();
        assert_eq!(e, 0);
        let stopper = std::thread::spawn(move || srv.shutdown());
        // Every request the server read gets its reply, then the connection closes.
        let mut answered = vec![first];
        loop {
            let mut h = [0u8; 16];
            match std::io::Read::read_exact(&mut c.s, &mut h) {
                Ok(()) => {
                    assert_eq!(&h[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
                    assert_eq!(&h[4..8], &[0, 0, 0, 0], "a reply before the close is a success");
                    answered.push(u64::from_be_bytes(h[8..16].try_into().unwrap()));
                }
                Err(e) => {
                    assert!(matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset), "{e}");
                    break;
                }
            }
        }
        let stats = stopper.join().unwrap();
        assert_eq!(answered.len() as u64, stats.requests, "every request read was answered");
        let file = std::fs::read(&path).unwrap();
        for h in answered {
            let off = (h * 4096) as usize;
            assert_eq!(&file[off..off + 4096], &pattern(h as u8, 4096)[..], "acknowledged write {h}");
        }
        std::fs::remove_file(path).unwrap();
    }

    fn unix_socket_and_several_iothreads(r: &Reactor) {
        let path = scratch_file(&format!("unix-{}", r.backend()), SIZE);
        let sock = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("nbd-{}-{}.sock", r.backend(), std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let mut cfg = Config::new(&path);
        cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
        cfg.unix = Some(sock.clone());
        cfg.iothreads = 3;
        cfg.export_name = "disk".into();
        cfg.backend = r.backend();
        let srv = Server::start(cfg).unwrap();
        // An existing socket path is not taken over.
        let mut again = Config::new(&path);
        again.unix = Some(sock.clone());
        again.tcp = None;
        let e = Server::start(again).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        let mut clients: Vec<Client> = (0..6).map(|_| session(&srv)).collect();
        let mut u = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        u.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        std::io::Read::read_exact(&mut u, &mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        for (i, c) in clients.iter_mut().enumerate() {
            let d = pattern(i as u8, 512);
            assert_eq!(c.write(0, 1, i as u64 * 512, &d), 0);
        }
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(c.read(2, i as u64 * 512, 512), (0, pattern(i as u8, 512)));
        }
        drop(clients);
        drop(u);
        srv.shutdown();
        assert!(!sock.exists(), "the socket is removed at shutdown");
        std::fs::remove_file(path).unwrap();
    }
}

/// The bytes a fresh scratch file holds at `off..off + len` (see `scratch_file`).
/// Sends 32 READs of 4 KiB, `stride` bytes apart from offset 0, in one send, and checks their
/// replies (in whatever order they come).
fn read_burst(c: &mut Client, stride: u64) {
    let mut out = Vec::new();
    for h in 0..32u64 {
        let r = proto::Request {
            flags: 0,
            kind: cmd::READ,
            handle: h,
            offset: h * stride,
            length: 4096,
        };
        out.extend_from_slice(&r.encode());
    }
    c.send(&out);
    for _ in 0..32 {
        let (e, h) = c.reply();
        assert_eq!(e, 0);
        assert_eq!(c.recv(4096), initial(h * stride, 4096), "read {h}");
    }
}

fn initial(off: u64, len: usize) -> Vec<u8> {
    (off as usize..off as usize + len)
        .map(|i| (i % 251) as u8 | 1)
        .collect()
}

#[test]
fn start_errors_are_clear() {
    let mut cfg = Config::new("/nonexistent/disk.img");
    cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
    let e = Server::start(cfg.clone()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
    cfg.tcp = None;
    let e = Server::start(cfg.clone()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
    cfg.iothreads = 0;
    assert_eq!(
        Server::start(cfg.clone()).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    cfg.iothreads = 1;
    cfg.max_memory = nbd_server::MIN_MAX_MEMORY - 1;
    let e = Server::start(cfg.clone()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("memory budget"), "{e}");
    cfg.max_memory = nbd_server::DEFAULT_MAX_MEMORY;
    cfg.max_connections = Some(0);
    assert_eq!(
        Server::start(cfg).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
}
