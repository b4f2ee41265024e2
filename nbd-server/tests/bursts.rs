//! Bursts of connections, measured from outside the `nbd-server` process on both backends:
//! rounds of thousands of connections at once, each through the handshake, then closed
//! together. The server's RSS after the last round is within a few MB of its RSS after the
//! first, and near what it was before the first (it once grew by about 19 KB per connection per round: 64, 122, 179 MB after three
//! rounds of 3,000), and its load (connections, and each IoThread's tasks, fd registrations
//! and io_uring operations in flight, from `SIGUSR1`) comes back to what it was before each
//! round. The same with connections stalled in the middle of a 64 KiB option until the
//! handshake limit closes them.

mod common;

use std::time::{Duration, Instant};

use common::watched::{Watched, sparse};
use common::*;
use tests::backend_tests;

const MB: u64 = 1 << 20;
/// RSS may differ by this much from round to round.
const SLACK: u64 = 8 * MB;
/// RSS after a round may be this much above what it was before the first.
const ABOVE_START: u64 = 24 * MB;
const ROUNDS: usize = 3;

/// Connections per round: 2,000, or fewer where the fd limit (raised to its hard limit first)
/// is lower; the server inherits the same limit.
fn per_round() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to read into and write from.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
    }
    let n = (lim.rlim_cur as usize).saturating_sub(200).min(2000);
    assert!(
        n >= 1000,
        "an fd limit of {} leaves too few for a burst",
        lim.rlim_cur
    );
    n
}

/// Waits until the server is idle again (its load as before the round), then for it to give
/// memory back; returns its RSS.
fn settled(srv: &mut Watched, idle: &str, round: usize) -> u64 {
    let load = srv.load_until(idle, Duration::from_secs(20));
    assert_eq!(load, idle, "round {round}: the load after the round");
    std::thread::sleep(nbd_server::MEMORY_QUIET + Duration::from_millis(1500));
    srv.rss()
}

fn rss_comes_back(backend: &str, start: u64, rss: &[u64]) {
    eprintln!(
        "{backend}: RSS {} MB before, after each round: {:?} MB",
        start / MB,
        rss.iter().map(|r| r / MB).collect::<Vec<_>>()
    );
    for (round, &r) in rss.iter().enumerate() {
        assert!(
            r <= start + ABOVE_START,
            "RSS {} MB after round {round}, {} MB before the first",
            r / MB,
            start / MB
        );
    }
    let (first, last) = (rss[0], *rss.last().unwrap());
    assert!(
        last <= first + SLACK,
        "RSS grew from {} MB after the first round to {} MB after the last",
        first / MB,
        last / MB
    );
}

backend_tests! {
    fn rounds_of_concurrent_connections_leave_no_memory_behind(r: &Reactor) {
        let n = per_round();
        let file = sparse(&format!("bursts-{}", r.backend()), MB);
        let max = n.to_string();
        let mut srv = Watched::start(r, "bursts", &file, &["--max-connections", &max], None);
        let idle = srv.load();
        assert!(idle.starts_with("connections 0; iothread 0: "), "{idle}");
        let start = srv.rss();
        let mut rss = Vec::new();
        for round in 0..ROUNDS {
            let t0 = Instant::now();
            let mut clients: Vec<Client> = (0..n).map(|_| srv.session()).collect();
            let busy = srv.load();
            assert!(busy.starts_with(&format!("connections {n};")), "round {round}: {busy}");
            // Over --max-connections: refused at once.
            for _ in 0..20 {
                assert!(Client::connect(srv.addr).closed_by_server(), "round {round}: refused");
            }
            // Closed every way a client closes: plainly, with NBD_CMD_DISC, with a reset,
            // and by the server after a request it cannot parse.
            for (i, c) in clients.iter_mut().enumerate() {
                match i % 4 {
                    0 => {}
                    1 => c.request(0, cmd::DISC, i as u64, 0, 0),
                    2 => drop(linger_zero(&c.s)),
                    _ => c.send(&[0xa5; 28]),
                }
            }
            drop(clients);
            rss.push(settled(&mut srv, &idle, round));
            eprintln!("{}: round {round} of {n} took {:?}", r.backend(), t0.elapsed());
        }
        rss_comes_back(&r.backend().to_string(), start, &rss);
        // And it still serves.
        let mut c = srv.session();
        assert_eq!(c.read(1, 0, 4096).0, 0);
        drop(c);
        drop(srv);
        std::fs::remove_file(file).unwrap();
    }

    fn rounds_of_connections_stalled_mid_option_leave_no_memory_behind(r: &Reactor) {
        let n = per_round();
        let file = sparse(&format!("stalls-{}", r.backend()), MB);
        let mut srv = Watched::start(r, "stalls", &file, &["--handshake-limit", "1"], None);
        let idle = srv.load();
        let start = srv.rss();
        let mut rss = Vec::new();
        for round in 0..ROUNDS {
            // Each announces a 64 KiB option, sends 60 KiB of it and stalls.
            let mut clients: Vec<Client> = (0..n)
                .map(|_| {
                    let mut c = Client::connect(srv.addr);
                    c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
                    let mut m = Vec::new();
                    m.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
                    m.extend_from_slice(&opt::GO.to_be_bytes());
                    m.extend_from_slice(&(64u32 << 10).to_be_bytes());
                    m.resize(m.len() + (60 << 10), 0);
                    c.send(&m);
                    c
                })
                .collect();
            // The handshake limit closes every one of them.
            for c in &mut clients {
                assert!(c.closed_by_server());
            }
            drop(clients);
            rss.push(settled(&mut srv, &idle, round));
        }
        rss_comes_back(&r.backend().to_string(), start, &rss);
        drop(srv);
        std::fs::remove_file(file).unwrap();
    }
}
