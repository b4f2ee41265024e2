//! The `nbd-server` binary against hostile clients, on both backends, measured from outside
//! its process: memory (RSS) under clients that never read their replies and after they
//! leave, CPU spent for a client that sends work and resets, log bytes per attack, log lines
//! while `accept` fails with `EMFILE`. (The reactor each test gets from `backend_tests!` only
//! names the backend the binary is told to use.)

mod common;

use std::time::{Duration, Instant};

use common::watched::{Watched, sparse};
use common::*;
use tests::backend_tests;

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
        let srv = Watched::start(r, "mem", &file, &[], None);
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
        let srv = Watched::start(r, "reset", &file, &[], None);
        let mut c = srv.session();
        assert_eq!(c.read(1, 0, 4096).0, 0);
        let before = srv.cpu_when_quiet(Duration::from_secs(5));
        // 2,000 READs of 32 MiB (56 KB of requests), then a reset.
        c.send(&reads(2000, 32 << 20));
        let sock = linger_zero(&c.s);
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
        let srv = Watched::start(r, "log", &file, &["-x", "disk"], None);
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
        let srv = Watched::start(r, "emfile", &file, &["--max-connections", "1000"], Some(48));
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
