//! Cancellation: dropping a future whose operation is in flight cancels it; its buffer lives
//! until the kernel is done; fds produced by cancelled accepts and opens are closed.
//!
//! These tests count the process's open fds, so they take a lock: no other test in this binary
//! opens or closes fds while one of them counts.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reactor::fs::File;
#[cfg(feature = "uring")]
use reactor::net::TcpStream;
use reactor::net::{SocketIo, TcpListener, UnixStream};
use reactor::{Backend, IoBuf, IoBufMut, Reactor, time};
use tests::{flush, open_fds};

static FDS: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    FDS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer that records when it is dropped.
struct Tracked {
    buf: Vec<u8>,
    dropped: Rc<Cell<bool>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.dropped.set(true);
    }
}

// SAFETY: delegates to the Vec, whose heap block is stable.
unsafe impl IoBuf for Tracked {
    fn stable_ptr(&self) -> *const u8 {
        self.buf.stable_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.buf.bytes_init()
    }
}

// SAFETY: delegates to the Vec.
unsafe impl IoBufMut for Tracked {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.buf.stable_mut_ptr()
    }
    fn bytes_total(&self) -> usize {
        self.buf.bytes_total()
    }
    unsafe fn set_init(&mut self, n: usize) {
        // SAFETY: passed on.
        unsafe { self.buf.set_init(n) }
    }
}

/// Polls until `done` or 10 s pass.
fn settle(r: &Reactor, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(10), "did not settle");
        r.poll(false);
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn cancelled_read(r: &Reactor) {
    let before = open_fds();
    let dropped = Rc::new(Cell::new(false));
    {
        let (a, _b) = r.block_on(async { UnixStream::pair() }).unwrap();
        let d2 = dropped.clone();
        let jh = r.spawn_local(async move {
            let buf = Tracked {
                buf: Vec::with_capacity(4096),
                dropped: d2,
            };
            let (res, _buf) = a.read(buf).await; // never completes: nobody writes
            res.map(drop)
        });
        flush(r); // the read is in flight
        let in_flight = r.ops_in_flight();
        jh.abort();
        r.poll(false); // the task drops the read's future
        if in_flight > 0 {
            // A completion operation: the kernel still owned the buffer at the abort; it is
            // freed only once the cancellation has come back.
            settle(r, || r.ops_in_flight() == 0);
        }
        flush(r);
        assert!(dropped.get(), "the buffer was freed after the cancellation");
        assert!(jh.is_finished());
    }
    flush(r);
    assert_eq!(open_fds(), before, "no fd leaked");
}

fn cancelled_accept(r: &Reactor) {
    let before = open_fds();
    {
        let l = r
            .block_on(async { TcpListener::bind("127.0.0.1:0".parse().unwrap()) })
            .unwrap();
        let addr = l.local_addr().unwrap();
        let l = Rc::new(l);
        // 1: cancelled while waiting.
        let l2 = l.clone();
        let jh = r.spawn_local(async move { l2.accept().await.map(drop) });
        flush(r);
        jh.abort();
        flush(r);
        settle(r, || r.ops_in_flight() == 0);
        assert!(jh.is_finished());
        // 2: cancelled after the kernel accepted a connection but before the task saw it.
        let l3 = l.clone();
        let jh = r.spawn_local(async move { l3.accept().await.map(drop) });
        flush(r);
        let client = std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        jh.abort();
        flush(r);
        settle(r, || r.ops_in_flight() == 0);
        drop(client);
        // A later accept still works (the listener was not disturbed).
        let l4 = l.clone();
        let jh = r.spawn_local(async move { l4.accept().await.map(drop) });
        let c2 = std::net::TcpStream::connect(addr).unwrap();
        r.block_on(jh).unwrap().unwrap();
        drop(c2);
    }
    flush(r);
    assert_eq!(open_fds(), before, "no fd leaked");
}

fn cancelled_open(r: &Reactor) {
    let before = open_fds();
    for _ in 0..20 {
        let jh = r.spawn_local(async { File::open("/proc/self/status").await.map(drop) });
        r.poll(false); // submitted (or handed to the pool)
        jh.abort();
        r.poll(false);
    }
    // On epoll the opens run on the pool, where a cancelled one opens and then closes its fd
    // whenever the job gets to run: wait for every job, not just for a moment when the count
    // happens to match (a job still queued would change it under the next test).
    settle(r, || {
        flush(r);
        r.thread_pool().pending() == 0 && open_fds() == before
    });
}

fn cancelled_sleep(r: &Reactor) {
    // (200 ms: under valgrind a 30 ms sleep could end during the first flush.)
    let t0 = Instant::now();
    let jh = r.spawn_local(time::sleep(Duration::from_millis(200)));
    flush(r);
    assert_eq!(r.bh_count(), 2, "task and timer");
    jh.abort();
    flush(r);
    assert_eq!(r.bh_count(), 0, "both freed");
    while t0.elapsed() < Duration::from_millis(250) {
        assert!(!r.poll(false), "nothing runs at the old deadline");
    }
}

/// Runs `f` on a fresh reactor of `backend` with the fd-count lock held, from before the
/// reactor exists until after it is gone.
fn locked(backend: Backend, socket_io: SocketIo, f: impl FnOnce(&Reactor)) {
    let _g = lock();
    let r = Reactor::builder()
        .backend(backend)
        .socket_io(socket_io)
        .build()
        .expect("backend must start");
    assert_eq!(r.backend(), backend);
    f(&r);
}

fn drop_reactor_with_ops_in_flight(backend: Backend) {
    let _g = lock();
    let before = open_fds();
    {
        let other = tests::reactor_on(backend);
        let dropped = Rc::new(Cell::new(false));
        let d2 = dropped.clone();
        let (a, b) = other.block_on(async { UnixStream::pair() }).unwrap();
        other
            .spawn_local(async move {
                let buf = Tracked {
                    buf: Vec::with_capacity(64),
                    dropped: d2,
                };
                let _ = a.read(buf).await;
            })
            .detach();
        flush(&other);
        drop(other); // cancels and waits for the read before freeing its buffer
        assert!(dropped.get());
        drop(b);
    }
    assert_eq!(open_fds(), before);
}

macro_rules! per_backend {
    ($($name:ident => $body:expr;)*) => {
        #[cfg(feature = "uring")]
        mod uring {
            use super::*;
            $( #[test] fn $name() { let f: fn(Backend) = $body; f(Backend::Uring) } )*
        }
        #[cfg(feature = "epoll")]
        mod epoll {
            use super::*;
            $( #[test] fn $name() { let f: fn(Backend) = $body; f(Backend::Epoll) } )*
        }
    };
}

per_backend! {
    cancel_in_flight_read => |b| locked(b, SocketIo::Readiness, cancelled_read);
    cancel_in_flight_accept => |b| locked(b, SocketIo::Readiness, cancelled_accept);
    cancel_in_flight_open => |b| locked(b, SocketIo::Readiness, cancelled_open);
    cancel_sleep => |b| locked(b, SocketIo::Readiness, cancelled_sleep);
    dropping_the_reactor_with_operations_in_flight => drop_reactor_with_ops_in_flight;
}

#[cfg(feature = "uring")]
mod uring_completion {
    use super::*;

    #[test]
    fn cancel_in_flight_read_with_completion_ops() {
        locked(Backend::Uring, SocketIo::Completion, cancelled_read);
    }

    #[test]
    fn cancel_in_flight_accept_with_completion_ops() {
        locked(Backend::Uring, SocketIo::Completion, cancelled_accept);
    }

    /// Polls `f` once inside the reactor's poll (so its operation is submitted) and gives it
    /// back, still pending, to be dropped outside the loop.
    #[allow(clippy::async_yields_async)] // on purpose: the future comes back unfinished
    fn started<F: std::future::Future + Unpin>(r: &Reactor, f: F) -> F {
        r.block_on(async move {
            let mut f = f;
            std::future::poll_fn(|cx| {
                assert!(std::pin::Pin::new(&mut f).poll(cx).is_pending());
                std::task::Poll::Ready(())
            })
            .await;
            f
        })
    }

    #[test]
    fn a_receive_dropped_outside_the_loop_is_cancelled_and_closes_its_socket() {
        locked(Backend::Uring, SocketIo::Completion, |r| {
            let before = open_fds();
            let (a, b) = r.block_on(async { UnixStream::pair() }).unwrap();
            let read = started(r, Box::pin(async move { a.read(vec![0u8; 64]).await }));
            flush(r);
            assert_eq!(r.ops_in_flight(), 1, "the receive waits for data");
            // Outside the loop: the stream and the read's future go; the receive, which keeps
            // the socket open, must not wait for data that never comes.
            drop(read);
            settle(r, || r.ops_in_flight() == 0);
            assert_eq!(open_fds(), before + 1, "the stream's socket is closed");
            drop(b);
        });
    }

    #[test]
    fn bytes_of_a_receive_whose_future_was_dropped_come_back_first() {
        locked(Backend::Uring, SocketIo::Completion, |r| {
            let (a, b) = r.block_on(async { UnixStream::pair() }).unwrap();
            let read = started(r, Box::pin(a.read(Vec::with_capacity(4))));
            flush(r);
            r.block_on(async { b.write_all(b"abcdef".to_vec()).await.0 })
                .unwrap();
            // The receive completes (with "abcd"), but its future is never polled again.
            settle(r, || r.ops_in_flight() == 0);
            drop(read);
            let got = r.block_on(async {
                let mut got = Vec::new();
                while got.len() < 6 {
                    let (res, buf) = a.read(Vec::with_capacity(3)).await;
                    got.extend_from_slice(&buf[..res.unwrap()]);
                }
                got
            });
            assert_eq!(got, b"abcdef", "in order, none lost, none twice");
        });
    }

    #[test]
    fn a_stream_holding_bytes_of_a_dropped_read_refuses_to_become_std() {
        locked(Backend::Uring, SocketIo::Completion, |r| {
            let (a, b) = r.block_on(async { UnixStream::pair() }).unwrap();
            let a = Rc::new(a);
            let a2 = a.clone();
            let read = started(
                r,
                Box::pin(async move { a2.read(Vec::with_capacity(8)).await }),
            );
            flush(r);
            r.block_on(async { b.write_all(b"held".to_vec()).await.0 })
                .unwrap();
            settle(r, || r.ops_in_flight() == 0);
            drop(read);
            let a = Rc::try_unwrap(a).ok().unwrap();
            let err = r.block_on(a.into_std()).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        });
    }

    #[test]
    fn connect_then_cancel_many_reads_with_completion_ops() {
        locked(Backend::Uring, SocketIo::Completion, |r| {
            let before = open_fds();
            r.block_on(async {
                let l = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
                let addr = l.local_addr().unwrap();
                let c = TcpStream::connect(addr).await.unwrap();
                let (s, _) = l.accept().await.unwrap();
                for _ in 0..50 {
                    let r = time::timeout(Duration::from_micros(200), s.read(vec![0u8; 128])).await;
                    assert!(r.is_err(), "nothing to read: the timeout cancels the read");
                }
                let (res, _) = c.write_all(b"still works".to_vec()).await;
                res.unwrap();
                let (res, buf) = s.read(Vec::with_capacity(64)).await;
                assert_eq!(&buf[..res.unwrap()], b"still works");
            });
            settle(r, || r.ops_in_flight() == 0);
            flush(r);
            assert_eq!(open_fds(), before);
        });
    }
}
