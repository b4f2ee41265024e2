//! Cancelled stream reads lose no byte and return none twice, on every backend and socket mode.
//!
//! A peer thread writes a known byte sequence in random pieces with random pauses. The reactor
//! side reads it with reads of random sizes that are cancelled after random delays, by a
//! `timeout` or by aborting the task that reads, and checks every byte it gets against the
//! sequence and the total against what the peer wrote. On io_uring in completion mode a `RECV`
//! that completes after its future was dropped took bytes from the socket: they must come back
//! through the stream's next read.
//!
//! `REACTOR_CANCEL_READS` sets the number of cancelled reads per test (100,000 by default;
//! the valgrind step uses fewer).

use std::cell::RefCell;
use std::io::Write;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reactor::net::{SocketIo, TcpStream};
use reactor::{Backend, Reactor, time};
use tests::{Rng, sequence_byte};

fn iterations() -> usize {
    std::env::var("REACTOR_CANCEL_READS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// Checks received bytes against the sequence, in order.
#[derive(Default)]
struct Checker {
    pos: u64,
    eof: bool,
}

impl Checker {
    fn feed(&mut self, got: &[u8]) {
        assert!(!self.eof, "bytes after the end of the stream");
        if got.is_empty() {
            self.eof = true;
        }
        for (i, &b) in got.iter().enumerate() {
            let p = self.pos + i as u64;
            assert_eq!(
                b,
                sequence_byte(p),
                "byte {p} is wrong: bytes were lost or returned twice"
            );
        }
        self.pos += got.len() as u64;
    }
}

/// The peer: writes the sequence in random pieces with random pauses until `stop`, then
/// closes. Returns how many bytes it wrote.
fn peer(mut s: std::net::TcpStream, stop: Arc<AtomicBool>, seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut pos = 0u64;
    let mut buf = vec![0u8; 16 << 10];
    while !stop.load(Ordering::Relaxed) {
        let len = rng.below(buf.len() as u64) as usize + 1;
        for (i, b) in buf[..len].iter_mut().enumerate() {
            *b = sequence_byte(pos + i as u64);
        }
        s.write_all(&buf[..len]).expect("the reader keeps reading");
        pos += len as u64;
        if rng.below(3) == 0 {
            std::thread::sleep(Duration::from_micros(rng.below(60)));
        }
    }
    pos
}

/// A loopback connection whose far end is the peer thread; runs `read` on the near end, then
/// reads the rest to the end and checks the total.
fn with_peer(r: &Reactor, seed: u64, read: impl AsyncFnOnce(Rc<TcpStream>, &RefCell<Checker>)) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let s = std::net::TcpStream::connect(addr).unwrap();
        peer(s, stop2, seed)
    });
    let (s, _) = l.accept().unwrap();
    let checker = RefCell::new(Checker::default());
    r.block_on(async {
        let s = Rc::new(TcpStream::from_std(s).unwrap());
        read(s.clone(), &checker).await;
        stop.store(true, Ordering::Relaxed);
        while !checker.borrow().eof {
            let (res, buf) = s.read(Vec::with_capacity(64 << 10)).await;
            let n = res.expect("read to the end");
            checker.borrow_mut().feed(&buf[..n]);
        }
    });
    let written = writer.join().unwrap();
    assert_eq!(
        checker.borrow().pos,
        written,
        "the reader got a different number of bytes than the peer wrote"
    );
}

/// Reads raced against `timeout`s of 0–40 µs.
fn timed_out_reads(r: &Reactor) {
    let n = iterations();
    let mut timeouts = 0;
    with_peer(r, 0x9e37_79b9, async |s, checker| {
        let mut rng = Rng(0x1234_5678);
        for _ in 0..n {
            let size = rng.below(8192) as usize + 1;
            let d = Duration::from_micros(rng.below(40));
            match time::timeout(d, s.read(Vec::with_capacity(size))).await {
                Ok((res, buf)) => {
                    let k = res.expect("read");
                    assert!(k > 0, "the peer is still writing");
                    checker.borrow_mut().feed(&buf[..k]);
                }
                Err(_) => timeouts += 1,
            }
        }
    });
    eprintln!("{timeouts} of {n} reads timed out");
    // (On a busy machine the peer runs less and more reads find data at once: 2.5 % of them
    // timed out with both CPUs taken by other processes, 9-11 % on an idle one.)
    assert!(
        timeouts > n / 100,
        "only {timeouts} of {n} reads timed out: the test did not cancel reads"
    );
}

/// Reads in tasks aborted after random delays.
fn aborted_reads(r: &Reactor) {
    let n = iterations();
    let mut aborted = 0;
    with_peer(r, 0x51_7cc1, async |s, checker| {
        let checker: &RefCell<Checker> = checker;
        // The tasks feed the checker through a shared handle (they are 'static).
        let shared = Rc::new(RefCell::new(Vec::<u8>::new()));
        let mut rng = Rng(0xdead_beef);
        for _ in 0..n {
            let size = rng.below(8192) as usize + 1;
            let (s2, out) = (s.clone(), shared.clone());
            let jh = Reactor::with_current(|r| {
                r.spawn_local(async move {
                    let (res, buf) = s2.read(Vec::with_capacity(size)).await;
                    let k = res.expect("read");
                    out.borrow_mut().extend_from_slice(&buf[..k]);
                })
            })
            .unwrap();
            match rng.below(3) {
                0 => {}
                1 => reactor::yield_now().await,
                _ => time::sleep(Duration::from_micros(rng.below(40))).await,
            }
            jh.abort();
            let res = jh.await;
            let got = std::mem::take(&mut *shared.borrow_mut());
            match res {
                Ok(()) => assert!(!got.is_empty(), "the peer is still writing"),
                Err(e) => {
                    assert!(e.is_cancelled(), "the task was aborted, not failed");
                    assert!(got.is_empty(), "an aborted read delivered nothing");
                    aborted += 1;
                }
            }
            checker.borrow_mut().feed_some(&got);
        }
    });
    eprintln!("{aborted} of {n} reads were aborted");
    assert!(
        aborted > n / 100,
        "only {aborted} of {n} reads were aborted: the test did not cancel reads"
    );
}

impl Checker {
    /// As `feed`, where an empty piece is no end of stream (an aborted read got nothing).
    fn feed_some(&mut self, got: &[u8]) {
        if !got.is_empty() {
            self.feed(got);
        }
    }
}

fn on(backend: Backend, io: SocketIo, f: fn(&Reactor)) {
    let r = Reactor::builder()
        .backend(backend)
        .socket_io(io)
        .build()
        .unwrap_or_else(|e| panic!("the {backend} backend cannot be created on this machine: {e}"));
    assert_eq!(r.backend(), backend, "forced backend must be used");
    f(&r);
}

macro_rules! modes {
    ($($mode:ident: $io:ident, $bk:ident;)*) => {$(
        mod $mode {
            use super::*;
            #[test]
            fn reads_raced_against_timeouts_lose_no_byte_and_repeat_none() {
                on(Backend::$bk, SocketIo::$io, timed_out_reads);
            }
            #[test]
            fn reads_in_aborted_tasks_lose_no_byte_and_repeat_none() {
                on(Backend::$bk, SocketIo::$io, aborted_reads);
            }
        }
    )*};
}

#[cfg(feature = "uring")]
mod uring {
    use super::*;
    modes! {
        completion: Completion, Uring;
        multishot: Multishot, Uring;
        readiness: Readiness, Uring;
    }
}

#[cfg(feature = "epoll")]
mod epoll {
    use super::*;
    modes! {
        readiness: Readiness, Epoll;
    }
}
