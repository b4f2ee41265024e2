//! A busy reactor takes work from other threads without any system call, and a socket read
//! after a short one waits for readiness instead of trying the socket.
//!
//! The home thread runs under a seccomp filter that makes `read`, `write` (the eventfd) and,
//! on io_uring, `io_uring_enter` fail with `EDOM`. `poll` survives a failing fd monitor (it
//! counts the failure in `Stats::monitor_errors`), so the test checks the counters: no
//! monitor error, no wakeup system call, no blocking wait. A second test makes the home thread
//! block once (a wait the filter forbids on io_uring, a blocking wait on epoll) and requires
//! the same checks to report it, so they are shown to fail when a call is made.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use reactor::Backend;
use tests::{backend_tests, reactor_on, seccomp};

const N: u64 = 20_000;

backend_tests! {
    fn a_busy_reactor_takes_cross_thread_work_without_system_calls(r: &Reactor) {
        let backend = r.backend();
        let calls = std::thread::spawn(move || run(backend, false))
            .join()
            .expect("home thread failed");
        assert!(calls.is_empty(), "system calls made while busy: {calls:?}");
    }

    fn the_check_sees_a_system_call_when_one_is_made(r: &Reactor) {
        let backend = r.backend();
        let calls = std::thread::spawn(move || run(backend, true))
            .join()
            .expect("home thread failed");
        assert!(!calls.is_empty(), "a blocking wait went unseen");
        if backend == Backend::Uring {
            assert!(
                calls.iter().any(|c| c.starts_with("monitor errors")),
                "the forbidden io_uring_enter went unseen: {calls:?}"
            );
        }
    }

    fn a_read_after_a_short_read_waits_for_readiness_without_a_system_call(r: &Reactor) {
        let backend = r.backend();
        std::thread::spawn(move || short_read(backend))
            .join()
            .expect("test thread failed");
    }
}

/// Runs the busy reactor under the filter; with `block_once`, the home thread also makes one
/// blocking poll (on a 200 ms timer) before the work starts. Returns the system calls the
/// counters show (empty: none).
fn run(backend: Backend, block_once: bool) -> Vec<String> {
    let r = reactor_on(backend);
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    // A BH that the home thread reschedules from callbacks: home-side schedules too.
    let me: std::rc::Rc<std::cell::RefCell<Option<reactor::Bh>>> = Default::default();
    let me2 = me.clone();
    let local_runs = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let lr = local_runs.clone();
    *me.borrow_mut() = Some(r.bh(move |_| {
        lr.set(lr.get() + 1);
        me2.borrow().as_ref().unwrap().schedule();
    }));
    // Let the backend settle: the eventfd's POLL_ADD is submitted.
    r.poll(false);
    r.poll(false);
    let timer = r.timer(|_| {});
    let before = r.stats();

    let mut denied = vec![libc::SYS_read, libc::SYS_write];
    if backend == Backend::Uring {
        denied.push(libc::SYS_io_uring_enter);
    }
    seccomp::deny_on_this_thread(&denied, libc::EDOM).expect("seccomp filter");
    if block_once {
        timer.arm_after(std::time::Duration::from_millis(200));
        while timer.is_armed() {
            r.poll(true);
        }
    }
    me.borrow().as_ref().unwrap().schedule();

    let go = Arc::new(AtomicBool::new(false));
    let (h, go2) = (r.handle(), go.clone());
    let producer = std::thread::spawn(move || {
        while !go2.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        for _ in 0..N {
            let n3 = n2.clone();
            h.oneshot(move |_| {
                n3.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
        }
    });
    go.store(true, Ordering::Release);
    while n.load(Ordering::Relaxed) < N {
        r.poll(false);
    }
    producer.join().unwrap();
    let after = r.stats();
    assert!(
        after.notify_skipped >= before.notify_skipped + N,
        "{after:?}"
    );
    assert!(local_runs.get() > 2, "the home thread's own schedules ran");
    me.borrow_mut().take();
    let mut calls = Vec::new();
    if after.monitor_errors != before.monitor_errors {
        calls.push(format!(
            "monitor errors: {} (a forbidden call failed)",
            after.monitor_errors - before.monitor_errors
        ));
    }
    if after.wakeups() != before.wakeups() {
        calls.push(format!("wakeups: {}", after.wakeups() - before.wakeups()));
    }
    if after.blocking_waits != before.blocking_waits {
        calls.push(format!(
            "blocking waits: {}",
            after.blocking_waits - before.blocking_waits
        ));
    }
    calls
}

/// A receive shorter than its buffer drained the socket: the next read (on the readiness path,
/// which epoll always takes) waits for an event instead of trying the socket first and
/// failing with `EAGAIN`.
fn short_read(backend: Backend) {
    use std::io::Write;
    let r = reactor::Reactor::builder()
        .backend(backend)
        .socket_io(reactor::net::SocketIo::Readiness)
        .build()
        .expect("reactor");
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    r.block_on(async {
        let s = reactor::net::UnixStream::from_std(a).unwrap();
        b.write_all(b"abc").unwrap();
        let (res, _) = s.read(Vec::with_capacity(64)).await;
        assert_eq!(res.unwrap(), 3, "a short read");
        // From here, a receive on this thread fails with EDOM instead of EAGAIN.
        seccomp::deny_on_this_thread(&[libc::SYS_recvfrom, libc::SYS_read], libc::EDOM)
            .expect("seccomp filter");
        let next = futures_lite::future::poll_once(s.read(Vec::with_capacity(64))).await;
        assert!(
            next.is_none(),
            "the read after a short one tried the socket: {:?}",
            next.map(|(res, _)| res)
        );
    });
}
