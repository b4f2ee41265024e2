//! A task whose I/O completes without waiting (cached file reads, a socket that always has
//! data) still returns to the loop: after its budget of such operations in one poll, the next
//! one yields first, so that other tasks, timers and fd handlers run in between.

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::AsyncReadExt;
use reactor::fs::File;
use reactor::{Async, DEFAULT_IO_BUDGET, Reactor};
use tests::backend_tests;

const OPS: u64 = 1000;

/// What a busy task saw of the rest of the loop: after how many of its own operations another
/// task first ran, and a timer first fired (`None`: not before it finished).
#[derive(Default)]
struct Seen {
    other_task: Cell<Option<u64>>,
    timer: Cell<Option<u64>>,
}

/// Runs `busy` (given the count of its operations so far, as it goes) beside another task and
/// an already expired timer, and returns when each of those was first seen.
fn run_beside<F>(r: &Reactor, busy: impl FnOnce(Rc<Cell<u64>>) -> F) -> Rc<Seen>
where
    F: std::future::Future<Output = ()> + 'static,
{
    let done = Rc::new(Cell::new(0u64));
    let seen = Rc::new(Seen::default());
    let (d, s) = (done.clone(), seen.clone());
    r.oneshot_after(Duration::ZERO, move |_| s.timer.set(Some(d.get())));
    // Let the timer expire before the busy task starts.
    std::thread::sleep(Duration::from_millis(2));
    r.block_on(async {
        let busy = Reactor::with_current(|r| r.spawn_local(busy(done.clone()))).unwrap();
        let (d, s) = (done.clone(), seen.clone());
        let other = Reactor::with_current(|r| {
            r.spawn_local(async move { s.other_task.set(Some(d.get())) })
        })
        .unwrap();
        busy.await.unwrap();
        other.await.unwrap();
    });
    assert_eq!(done.get(), OPS);
    seen
}

/// Both were seen while the busy task was at most about one budget into its operations.
fn assert_took_turns(seen: &Seen, what: &str) {
    let bound = 2 * u64::from(DEFAULT_IO_BUDGET) + 2;
    for (who, at) in [
        ("another task", seen.other_task.get()),
        ("a timer", seen.timer.get()),
    ] {
        let at = at.unwrap_or_else(|| panic!("{who} never ran while {what}"));
        assert!(at <= bound, "{who} waited for {at} operations while {what}");
    }
}

/// Eight bytes from `s` (through `AsyncRead`); returns the first.
async fn read(s: &mut Async<UnixStream>) -> std::io::Result<u8> {
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf).await.map(|()| buf[0])
}

/// A loopback connection accepted on `r` (a multishot reactor) from a peer thread that sends
/// `data` and then keeps (`keep`) or closes its end; the peer's thread returns its socket.
fn accepted(
    r: &Reactor,
    data: Vec<u8>,
    keep: bool,
) -> (
    reactor::net::TcpStream,
    std::thread::JoinHandle<Option<std::net::TcpStream>>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(&data).unwrap();
        keep.then_some(c)
    });
    let stream = r.block_on(async {
        let listener = reactor::net::TcpListener::from_std(listener).unwrap();
        listener.accept().await.unwrap().0
    });
    (stream, peer)
}

fn scratch(name: &str, r: &Reactor) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    dir.join(format!(
        "budget-{name}-{}-{}",
        r.backend(),
        std::process::id()
    ))
}

backend_tests! {
    fn a_task_reading_a_cached_file_lets_other_tasks_and_timers_run(r: &Reactor) {
        let path = scratch("cached", r);
        std::fs::write(&path, vec![9u8; 1 << 16]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 1 << 16);
        let f = File::from_std(std::fs::File::open(&path).unwrap());
        let before = r.stats();
        let seen = run_beside(r, move |done| async move {
            let mut buf = Vec::with_capacity(4096);
            for i in 0..OPS {
                let (res, b) = f.read_at(buf, (i % 16) * 4096).await;
                assert_eq!(res.unwrap(), 4096);
                buf = b;
                done.set(i + 1);
            }
        });
        let after = r.stats();
        // The premise: the page cache served the reads on the loop thread.
        assert!(after.inline_io - before.inline_io >= OPS - 10, "{after:?}");
        assert_took_turns(&seen, "a task read a cached file");
        let yields = after.io_budget_yields - before.io_budget_yields;
        let per = u64::from(DEFAULT_IO_BUDGET);
        assert!((OPS / per - 1..=OPS / per + 1).contains(&yields), "{yields} yields");
        std::fs::remove_file(&path).unwrap();
    }

    fn a_task_draining_a_socket_that_always_has_data_lets_others_run(r: &Reactor) {
        let (a, b) = UnixStream::pair().unwrap();
        // Everything the reads want is there before they start.
        (&a).write_all(&vec![5u8; (OPS * 16) as usize]).unwrap();
        let before = r.stats();
        let seen = run_beside(r, move |done| async move {
            let b = Async::new(b).unwrap();
            for i in 0..OPS {
                let mut buf = [0u8; 16];
                let n = b.read_with(|s| (&*s).read(&mut buf)).await.unwrap();
                assert_eq!(n, 16);
                done.set(i + 1);
            }
        });
        assert_took_turns(&seen, "a task read a socket that always had data");
        let per = u64::from(DEFAULT_IO_BUDGET);
        assert!(r.stats().io_budget_yields - before.io_budget_yields >= OPS / per - 1);
        drop(a);
    }

    fn a_futures_io_reader_of_a_full_socket_lets_others_run(r: &Reactor) {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&vec![6u8; (OPS * 16) as usize]).unwrap();
        let seen = run_beside(r, move |done| async move {
            let mut b = Async::new(b).unwrap();
            for i in 0..OPS {
                let mut buf = [0u8; 16];
                b.read_exact(&mut buf).await.unwrap();
                assert_eq!(buf, [6u8; 16]);
                done.set(i + 1);
            }
        });
        assert_took_turns(&seen, "an AsyncRead reader read a full socket");
        drop(a);
    }

    fn a_task_reading_a_multishot_stream_with_data_held_lets_others_run(r: &Reactor) {
        // On io_uring the stream's receive holds what arrived in ring buffers; on epoll this
        // is readiness again.
        let r = tests::multishot_on(r.backend());
        let (s, sender) = accepted(&r, vec![7u8; (OPS * 16) as usize], true);
        let stream = r.block_on(async {
            // Arm the receive, then let everything arrive before the busy reads start.
            let (res, _) = s.read(Vec::with_capacity(16)).await;
            assert_eq!(res.unwrap(), 16);
            reactor::time::sleep(Duration::from_millis(100)).await;
            s
        });
        let seen = run_beside(&r, move |done| async move {
            // Counted in 16-byte units, as the other tests count reads (a read may come back
            // short where the data arrived in pieces).
            let mut got = 16;
            while got < OPS * 16 {
                let (res, buf) = stream.read(Vec::with_capacity(16)).await;
                let n = res.unwrap();
                assert!(n > 0 && buf.iter().all(|&b| b == 7));
                got += n as u64;
                done.set(got / 16);
            }
        });
        assert_took_turns(&seen, "a task read a stream whose data was already received");
        drop(sender.join().unwrap());
    }

    fn a_task_reading_on_after_the_end_of_a_stream_lets_others_run(r: &Reactor) {
        // Each read after the peer closed returns 0 at once (on io_uring from the multishot
        // receive's state): that spends the budget too.
        let r = tests::multishot_on(r.backend());
        let (s, peer) = accepted(&r, b"last words".to_vec(), false);
        let stream = r.block_on(async {
            let mut got = Vec::new();
            loop {
                let (res, buf) = s.read(Vec::with_capacity(64)).await;
                if res.unwrap() == 0 {
                    break;
                }
                got.extend_from_slice(&buf);
            }
            assert_eq!(got, b"last words");
            s
        });
        peer.join().unwrap();
        let seen = run_beside(&r, move |done| async move {
            for i in 0..OPS {
                let (res, _) = stream.read(Vec::with_capacity(64)).await;
                assert_eq!(res.unwrap(), 0);
                done.set(i + 1);
            }
        });
        assert_took_turns(&seen, "a task read on after the end of a stream");
    }

    fn large_reads_spend_the_budget_by_their_size(r: &Reactor) {
        // A 1 MiB copy from the page cache takes longer than a hundred small reads: each spends
        // 1 + 16 units (one per 64 KiB), so a task yields after 4 of them, not after 64.
        const MIB: usize = 1 << 20;
        let path = scratch("large", r);
        std::fs::write(&path, vec![8u8; 4 * MIB]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 4 * MIB);
        let f = File::from_std(std::fs::File::open(&path).unwrap());
        let before = r.stats();
        let done = Rc::new(Cell::new(0u64));
        let seen = Rc::new(Cell::new(None::<u64>));
        r.block_on(async {
            let d = done.clone();
            let busy = Reactor::with_current(|r| {
                r.spawn_local(async move {
                    let mut buf = Vec::with_capacity(MIB);
                    for i in 0..40u64 {
                        let (res, b) = f.read_at(buf, (i % 4) * MIB as u64).await;
                        assert_eq!(res.unwrap(), MIB);
                        buf = b;
                        d.set(i + 1);
                    }
                })
            })
            .unwrap();
            let (d, s) = (done.clone(), seen.clone());
            let other = Reactor::with_current(|r| r.spawn_local(async move { s.set(Some(d.get())) }))
                .unwrap();
            busy.await.unwrap();
            other.await.unwrap();
        });
        let after = r.stats();
        // The premise: every read was served inline (a miss would go to the ring or the pool,
        // and its wait would start a new poll with a full budget).
        assert_eq!(after.inline_io - before.inline_io, 40, "{after:?}");
        let at = seen.get().expect("the other task ran");
        assert!(at <= 4, "the other task waited for {at} reads of 1 MiB");
        let yields = after.io_budget_yields - before.io_budget_yields;
        assert!((9..=11).contains(&yields), "{yields} yields for 40 reads of 1 MiB");
        std::fs::remove_file(&path).unwrap();
    }

    fn each_task_poll_has_a_budget_of_its_own(r: &Reactor) {
        let path = scratch("per-task", r);
        std::fs::write(&path, [4u8; 4096]).unwrap();
        let f = File::from_std(std::fs::File::open(&path).unwrap());
        let before = r.stats();
        r.block_on(async {
            // Two tasks polled in the same iteration, each using its whole budget.
            let tasks: Vec<_> = (0..2)
                .map(|_| {
                    let f = f.clone();
                    Reactor::with_current(|r| {
                        r.spawn_local(async move {
                            for _ in 0..DEFAULT_IO_BUDGET {
                                let (res, _) = f.read_at(Vec::with_capacity(4096), 0).await;
                                assert_eq!(res.unwrap(), 4096);
                            }
                        })
                    })
                    .unwrap()
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let after = r.stats();
        let inline = after.inline_io - before.inline_io;
        assert_eq!(inline, 2 * u64::from(DEFAULT_IO_BUDGET), "{after:?}");
        assert_eq!(after.io_budget_yields, before.io_budget_yields, "{after:?}");
        std::fs::remove_file(&path).unwrap();
    }

    fn a_task_waiting_on_more_sources_than_its_budget_spends_nothing_while_it_waits(r: &Reactor) {
        // One task waits on three sockets with a budget of two: the reads that wait must not
        // use it up, or the third would yield forever instead of waiting.
        let small = Reactor::builder().backend(r.backend()).io_budget(2).build().unwrap();
        let pairs: Vec<_> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
        let (ours, theirs): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            for (i, mut s) in theirs.into_iter().enumerate() {
                s.write_all(&[i as u8; 8]).unwrap();
            }
        });
        let got = small.block_on(async move {
            let mut socks: Vec<_> = ours.into_iter().map(|s| Async::new(s).unwrap()).collect();
            let (a, rest) = socks.split_at_mut(1);
            let (b, c) = rest.split_at_mut(1);
            let all = futures_lite::future::zip(
                futures_lite::future::zip(read(&mut a[0]), read(&mut b[0])),
                read(&mut c[0]),
            );
            reactor::time::timeout(Duration::from_secs(10), all).await
        });
        writer.join().unwrap();
        let ((x, y), z) = got.expect("all three reads completed");
        assert_eq!((x.unwrap(), y.unwrap(), z.unwrap()), (0, 1, 2));
        // While they waited, the task did not spin on yields: at most the reads that completed
        // in one poll went over the budget.
        let s = small.stats();
        assert!(s.io_budget_yields <= 3, "{s:?}");
    }

    fn the_budget_is_per_task_poll_and_can_be_set(r: &Reactor) {
        // Two reads per poll: every second read of a cached file yields first.
        let small = Reactor::builder().backend(r.backend()).io_budget(2).build().unwrap();
        let path = scratch("small", r);
        std::fs::write(&path, [3u8; 4096]).unwrap();
        let f = File::from_std(std::fs::File::open(&path).unwrap());
        small.block_on(async {
            for _ in 0..10 {
                let (res, _) = f.read_at(Vec::with_capacity(4096), 0).await;
                assert_eq!(res.unwrap(), 4096);
            }
        });
        let s = small.stats();
        assert!(s.inline_io >= 9, "{s:?}");
        assert!((4..=5).contains(&s.io_budget_yields), "{s:?}");
        std::fs::remove_file(&path).unwrap();
    }
}
