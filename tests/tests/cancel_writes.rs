//! Cancelled stream writes: the outcome of a dropped write is never lost, on every backend and
//! socket mode. By readiness a dropped write sent nothing; by an io_uring `SEND` it may have
//! sent a prefix of its buffer, which `bytes_sent` counts once `flush` returns. A writer that
//! resumes from what `bytes_sent` says sends the sequence exactly once.
//!
//! `REACTOR_CANCEL_WRITES` sets the number of writes per test (20,000 by default).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::time::Duration;

use futures_lite::AsyncWriteExt;
use reactor::net::{SocketIo, TcpStream};
use reactor::{Backend, Reactor, time};
use tests::{Rng, sequence_byte};

fn iterations() -> usize {
    std::env::var("REACTOR_CANCEL_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// Shrinks a socket's buffer (`SO_SNDBUF` or `SO_RCVBUF`) so that writes wait for the peer.
fn small_buffer(fd: &impl AsRawFd, opt: libc::c_int) {
    let size: libc::c_int = 8 << 10;
    // SAFETY: setsockopt reads one int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

/// The peer: reads in random pieces with random pauses (so the socket fills and writes wait),
/// checks every byte against the sequence, and returns how many it read.
fn peer(mut s: std::net::TcpStream) -> u64 {
    let mut rng = Rng(0xfeed);
    let mut pos = 0u64;
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let want = rng.below(buf.len() as u64) as usize + 1;
        let n = s.read(&mut buf[..want]).unwrap();
        if n == 0 {
            return pos;
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            let p = pos + i as u64;
            assert_eq!(
                b,
                sequence_byte(p),
                "byte {p}: bytes were lost or sent twice"
            );
        }
        pos += n as u64;
        if rng.below(4) == 0 {
            std::thread::sleep(Duration::from_micros(rng.below(200)));
        }
    }
}

fn dropped_writes(r: &Reactor, mode: SocketIo) {
    let n = iterations();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    small_buffer(&l, libc::SO_RCVBUF);
    let addr = l.local_addr().unwrap();
    let reader = std::thread::spawn(move || peer(l.accept().unwrap().0));
    let by_ring = r.backend() == Backend::Uring && mode != SocketIo::Readiness;
    let (mut dropped, mut dropped_that_sent) = (0, 0);
    let total = r.block_on(async {
        let s = TcpStream::connect(addr).await.unwrap();
        small_buffer(&s, libc::SO_SNDBUF);
        let mut rng = Rng(0xabcdef);
        let mut pos = 0u64;
        // At least n writes, and on until enough were dropped (and, by ring, one dropped
        // SEND completed): how many time out depends on how fast the peer thread reads, which
        // a loaded machine changes. At most 10n.
        let mut i = 0;
        while i < 10 * n {
            let reached = dropped > n / 20 && (!by_ring || dropped_that_sent > 0);
            if i >= n && reached {
                break;
            }
            i += 1;
            let len = rng.below(16 << 10) + 1;
            let buf: Vec<u8> = (pos..pos + len).map(sequence_byte).collect();
            let before = s.bytes_sent();
            let d = Duration::from_micros(rng.below(50));
            match time::timeout(d, s.write(buf)).await {
                Ok((res, _)) => {
                    let k = res.expect("write") as u64;
                    assert_eq!(s.bytes_sent() - before, k, "a write counts what it sent");
                    pos += k;
                }
                Err(_) => {
                    dropped += 1;
                    s.flush().await.unwrap();
                    let sent = s.bytes_sent() - before;
                    assert!(sent <= len, "a dropped write sent at most its buffer");
                    if sent > 0 {
                        assert!(by_ring, "by readiness a dropped write sends nothing");
                        dropped_that_sent += 1;
                    }
                    pos += sent;
                }
            }
        }
        // The futures-io side resumes the same sequence.
        let mut s = s;
        let tail: Vec<u8> = (pos..pos + 1000).map(sequence_byte).collect();
        AsyncWriteExt::write_all(&mut s, &tail).await.unwrap();
        AsyncWriteExt::flush(&mut s).await.unwrap();
        pos += 1000;
        assert_eq!(s.bytes_sent(), pos, "every byte sent is counted once");
        pos
    });
    assert_eq!(reader.join().unwrap(), total, "the peer read what was sent");
    assert!(
        dropped > n / 20,
        "only {dropped} writes of {n} to {} were dropped: the test did not cancel writes",
        10 * n
    );
    if by_ring {
        assert!(
            dropped_that_sent > 0,
            "no dropped SEND completed: the test did not reach the case it is for"
        );
    }
}

macro_rules! modes {
    ($($mode:ident: $io:ident, $bk:ident;)*) => {$(
        #[test]
        fn $mode() {
            let r = Reactor::builder()
                .backend(Backend::$bk)
                .socket_io(SocketIo::$io)
                .build()
                .unwrap_or_else(|e| panic!("the {} backend cannot be created here: {e}", Backend::$bk));
            assert_eq!(r.backend(), Backend::$bk, "forced backend must be used");
            dropped_writes(&r, SocketIo::$io);
        }
    )*};
}

#[cfg(feature = "uring")]
mod uring {
    use super::*;
    modes! {
        dropped_writes_by_completion_are_counted_and_resumable: Completion, Uring;
        dropped_writes_by_multishot_are_counted_and_resumable: Multishot, Uring;
        dropped_writes_by_readiness_send_nothing: Readiness, Uring;
    }
}

#[cfg(feature = "epoll")]
mod epoll {
    use super::*;
    modes! {
        dropped_writes_by_readiness_send_nothing: Readiness, Epoll;
    }
}
