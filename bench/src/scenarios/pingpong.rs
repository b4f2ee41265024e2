//! `pingpong`: a BH bounced between two reactors on two threads (round-trip ns), beside a raw
//! eventfd+epoll ping-pong and a futex ping-pong measured in the same process.
//!
//! Both reactors sleep between bounces, so every half trip is a cross-thread wakeup: the
//! producer sees `notify_me` set and writes the eventfd. This is the cost the adaptive polling
//! work attacks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread;

use reactor::{Backend, Bh, PollParams, Reactor, Wakeup};

use crate::measure::{Metric, Sample, time};
use crate::scenarios::{Ctx, Row, System};

/// Adaptive polling for the `-poll` rows. The poll time must be allowed to exceed a sleeping
/// round trip (~40 µs here), or a first wait longer than the maximum shrinks it to zero before
/// it ever grows (QEMU's default of 32 µs would never switch on in this scenario).
pub const POLL: PollParams = PollParams {
    max: std::time::Duration::from_micros(200),
    grow: 2,
    shrink: 0,
};

pub fn run(ctx: &Ctx) -> Vec<Row> {
    let n = ctx.scale(20_000, 2_000);
    let mut systems: Vec<System> = [Backend::Uring, Backend::Epoll]
        .into_iter()
        .map(|b| {
            System::new(format!("reactor-{b}"), move || {
                reactor_pingpong(b, Wakeup::Auto, PollParams::OFF, n)
            })
        })
        .collect();
    systems.extend([
        // io_uring woken through its eventfd instead of ring messages.
        System::new("reactor-uring-eventfd", move || {
            reactor_pingpong(Backend::Uring, Wakeup::EventFd, PollParams::OFF, n)
        }),
        System::new("tokio", move || tokio_pingpong(n)),
        System::new("floor-eventfd-epoll", move || eventfd_pingpong(n)),
        System::new("floor-futex", move || futex_pingpong(n)),
        System::new("floor-msg-ring", move || msg_ring_pingpong(n)),
    ]);
    let mut rows = ctx.interleave_counting_syscalls("pingpong", Metric::NsPerOp, systems);
    // With adaptive polling on, the same bounce against the in-process spinning floor.
    let np = ctx.scale(200_000, 50_000);
    let mut systems: Vec<System> = [Backend::Uring, Backend::Epoll]
        .into_iter()
        .map(|b| {
            System::new(format!("reactor-{b}"), move || {
                reactor_pingpong(b, Wakeup::Auto, POLL, np)
            })
        })
        .collect();
    systems.push(System::new("floor-spin", move || spin_pingpong(np)));
    rows.extend(ctx.interleave_counting_syscalls("pingpong-poll", Metric::NsPerOp, systems));
    rows
}

/// The spinning floor: two threads handing a token back and forth through one atomic, neither
/// ever sleeping.
fn spin_pingpong(n: u64) -> Sample {
    let word = Arc::new(AtomicU64::new(0));
    let w2 = word.clone();
    let t = thread::spawn(move || {
        for i in 0..n {
            // Acquire/Release: the hand-over of the token between the two threads.
            while w2.load(Ordering::Acquire) != 2 * i + 1 {
                std::hint::spin_loop();
            }
            w2.store(2 * i + 2, Ordering::Release);
        }
    });
    let s = time(Metric::NsPerOp, n, || {
        for i in 0..n {
            word.store(2 * i + 1, Ordering::Release);
            while word.load(Ordering::Acquire) != 2 * i + 2 {
                std::hint::spin_loop();
            }
        }
    });
    t.join().unwrap();
    s
}

/// tokio's equivalent: two current_thread runtimes on two threads bouncing a message over
/// two channels.
fn tokio_pingpong(n: u64) -> Sample {
    let (to_b, mut b_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let (to_a, mut a_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let b = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            while let Some(v) = b_rx.recv().await {
                if to_a.send(v).is_err() {
                    return;
                }
            }
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = time(Metric::NsPerOp, n, || {
        rt.block_on(async {
            for i in 0..n {
                to_b.send(i).unwrap();
                assert_eq!(a_rx.recv().await, Some(i));
            }
        })
    });
    drop(to_b);
    b.join().unwrap();
    s
}

/// Reactor A schedules B's BH, which schedules A's BH: one round trip.
fn reactor_pingpong(backend: Backend, wakeup: Wakeup, poll: PollParams, n: u64) -> Sample {
    let (tx, rx) = std::sync::mpsc::channel::<Arc<Bh>>();
    let (tx_a, rx_a) = std::sync::mpsc::channel::<Arc<Bh>>();
    let done = Arc::new(AtomicBool::new(false));
    let done_b = done.clone();
    let b = thread::spawn(move || {
        let r = Reactor::builder()
            .backend(backend)
            .wakeup(wakeup)
            .poll(poll)
            .build()
            .expect("reactor B");
        let ping_a: Arc<Bh> = rx_a.recv().unwrap();
        let pong = Arc::new(r.bh(move |_| ping_a.schedule()));
        tx.send(pong).unwrap();
        r.run_until(|| done_b.load(Ordering::Acquire));
        r.stats()
    });
    let r = Reactor::builder()
        .backend(backend)
        .wakeup(wakeup)
        .poll(poll)
        .build()
        .expect("reactor A");
    assert_eq!(r.backend(), backend);
    if backend == Backend::Uring {
        assert_eq!(
            r.wakeup(),
            wakeup,
            "this kernel sends ring messages (6.13+)"
        );
    }
    let count = Arc::new(AtomicU64::new(0));
    let pong_slot: Arc<std::sync::OnceLock<Arc<Bh>>> = Arc::new(std::sync::OnceLock::new());
    let (count2, slot2, done2) = (count.clone(), pong_slot.clone(), done.clone());
    let ping = Arc::new(r.bh(move |_| {
        let c = count2.fetch_add(1, Ordering::Relaxed) + 1;
        if c < n {
            slot2.get().unwrap().schedule();
        } else {
            done2.store(true, Ordering::Release);
            slot2.get().unwrap().schedule(); // wakes B so it sees `done`
        }
    }));
    tx_a.send(ping.clone()).unwrap();
    let pong = rx.recv().unwrap();
    let _ = pong_slot.set(pong.clone());
    let sample = time(Metric::NsPerOp, n, || {
        pong.schedule();
        r.run_until(|| count.load(Ordering::Relaxed) >= n);
    });
    b.join().unwrap();
    assert_eq!(
        count.load(Ordering::Relaxed),
        n,
        "every round trip completed"
    );
    sample
}

fn eventfd() -> i32 {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    fd
}

fn epoll_on(fd: i32) -> i32 {
    // SAFETY: plain system calls on fds this function owns; the event is copied by the kernel.
    unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        assert!(ep >= 0);
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0,
        };
        assert_eq!(libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev), 0);
        ep
    }
}

/// Wait on `ep`, then clear `efd`.
fn epoll_take(ep: i32, efd: i32) {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    let mut v = 0u64;
    // SAFETY: one event buffer and one u64, both live for the calls.
    unsafe {
        while libc::epoll_wait(ep, &mut ev, 1, -1) != 1 {}
        assert_eq!(libc::read(efd, (&raw mut v).cast(), 8), 8);
    }
}

fn eventfd_write(efd: i32) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64.
    assert_eq!(unsafe { libc::write(efd, (&raw const one).cast(), 8) }, 8);
}

/// Two threads, each waiting in epoll on its own eventfd and writing the other's.
fn eventfd_pingpong(n: u64) -> Sample {
    let (ea, eb) = (eventfd(), eventfd());
    let (pa, pb) = (epoll_on(ea), epoll_on(eb));
    let t = thread::spawn(move || {
        for _ in 0..n {
            epoll_take(pb, eb);
            eventfd_write(ea);
        }
    });
    let s = time(Metric::NsPerOp, n, || {
        for _ in 0..n {
            eventfd_write(eb);
            epoll_take(pa, ea);
        }
    });
    t.join().unwrap();
    for fd in [ea, eb, pa, pb] {
        // SAFETY: closing fds this function opened.
        unsafe { libc::close(fd) };
    }
    s
}

fn futex_wait(word: &AtomicU32, val: u32) {
    // SAFETY: FUTEX_WAIT on a live, aligned u32.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            val,
            std::ptr::null::<libc::timespec>(),
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a live, aligned u32.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        )
    };
}

/// Two threads handing a token back and forth through a futex word (0: A's turn, 1: B's).
fn futex_pingpong(n: u64) -> Sample {
    let word = Arc::new(AtomicU32::new(0));
    let w2 = word.clone();
    let t = thread::spawn(move || {
        for _ in 0..n {
            // Acquire/Release: the hand-over of the turn between the two threads.
            while w2.load(Ordering::Acquire) != 1 {
                futex_wait(&w2, 0);
            }
            w2.store(0, Ordering::Release);
            futex_wake(&w2);
        }
    });
    let s = time(Metric::NsPerOp, n, || {
        for _ in 0..n {
            word.store(1, Ordering::Release);
            futex_wake(&word);
            while word.load(Ordering::Acquire) != 0 {
                futex_wait(&word, 1);
            }
        }
    });
    t.join().unwrap();
    s
}

/// A ring set up as a raw ring-message user would (one issuer, completion work deferred to its
/// waits), on the calling thread.
fn msg_ring() -> io_uring::IoUring {
    io_uring::IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8)
        .expect("an io_uring with SINGLE_ISSUER and DEFER_TASKRUN (Linux 6.1)")
}

/// Queues a ring message to the ring `to` (no completion on the sender's ring unless it
/// fails).
fn msg_ring_push(ring: &mut io_uring::IoUring, to: i32) {
    let sqe = io_uring::opcode::MsgRingData::new(io_uring::types::Fd(to), 0, 1, None)
        .build()
        .flags(io_uring::squeue::Flags::SKIP_SUCCESS);
    // SAFETY: a ring message refers to no memory of ours.
    unsafe { ring.submission().push(&sqe) }.expect("room in an 8-entry ring");
}

/// Waits for one message on `ring` (after submitting what is queued) and consumes it.
fn msg_ring_take(ring: &mut io_uring::IoUring) {
    loop {
        if let Some(cqe) = ring.completion().next() {
            assert!(cqe.result() >= 0, "ring message failed: {}", cqe.result());
            return;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => panic!("io_uring_enter: {e}"),
        }
    }
}

/// The ring-message floor: two threads, each waiting on its own ring and posting a message
/// into the other's (`IORING_OP_MSG_RING`); a hop is one `io_uring_enter` that both sends and
/// waits.
fn msg_ring_pingpong(n: u64) -> Sample {
    use std::os::fd::AsRawFd;
    let (tx_b, rx_b) = std::sync::mpsc::channel::<i32>();
    let (tx_a, rx_a) = std::sync::mpsc::channel::<i32>();
    let t = thread::spawn(move || {
        let mut rb = msg_ring();
        tx_b.send(rb.as_raw_fd()).unwrap();
        let fa = rx_a.recv().unwrap();
        for _ in 0..n {
            msg_ring_take(&mut rb);
            msg_ring_push(&mut rb, fa);
            rb.submit().expect("submit the reply");
        }
        rb // kept alive until the other side is done with it
    });
    let mut ra = msg_ring();
    tx_a.send(ra.as_raw_fd()).unwrap();
    let fb = rx_b.recv().unwrap();
    let s = time(Metric::NsPerOp, n, || {
        for _ in 0..n {
            msg_ring_push(&mut ra, fb);
            msg_ring_take(&mut ra);
        }
    });
    drop(t.join().unwrap());
    s
}
