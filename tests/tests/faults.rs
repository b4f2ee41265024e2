//! Fault injection: an fd closed while registered and its number reused; io_uring forbidden by
//! seccomp; signal storms during blocking waits.

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reactor::{Backend, FdHandler, Reactor};
use tests::{backend_tests, flush, pipe, read_fd, write_fd};

/// Moves `fd` to a number at or above `at` (numbers no other test uses), closing the original.
fn renumber(fd: OwnedFd, at: i32) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC on an open fd; the result is checked and owned below.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, at) };
    assert!(n >= at);
    // SAFETY: a fresh descriptor owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(n) }
}

fn counting_reader(r: &Reactor, fd: Rc<OwnedFd>, n: Rc<Cell<u32>>) -> reactor::FdId {
    r.add_fd(
        fd.as_raw_fd(),
        FdHandler::new().on_read(move |_, _| {
            n.set(n.get() + 1);
            let mut b = [0u8; 64];
            read_fd(&fd, &mut b);
        }),
    )
    .unwrap()
}

backend_tests! {
    fn fd_closed_while_registered_and_its_number_reused(r: &Reactor) {
        let at = if r.backend() == Backend::Uring { 740 } else { 840 };
        let (a_rd, a_wr) = pipe().unwrap();
        let a_rd = renumber(a_rd, at);
        let n = a_rd.as_raw_fd();
        // A registration whose callback only counts: the fd is closed behind its back.
        let a_runs = Rc::new(Cell::new(0u32));
        let a2 = a_runs.clone();
        let a_id = r.add_fd(n, FdHandler::new().on_read(move |_, _| a2.set(a2.get() + 1))).unwrap();
        flush(r);
        let (b_rd, b_wr) = pipe().unwrap();
        drop(a_rd);
        // SAFETY: dup2 onto the number just closed (no other test uses this range).
        assert_eq!(unsafe { libc::dup2(b_rd.as_raw_fd(), n) }, n);
        // SAFETY: `n` now owns a duplicate of B's read end.
        let b_at_n = Rc::new(unsafe { OwnedFd::from_raw_fd(n) });
        drop(b_rd);
        // The new file under the old number registers fine: the old registration is stale.
        let b_runs = Rc::new(Cell::new(0u32));
        let b_id = counting_reader(r, b_at_n.clone(), b_runs.clone());
        write_fd(&b_wr, b"to B");
        assert!(r.poll(true));
        assert_eq!(b_runs.get(), 1, "B's event reached B");
        // A's own hang-up, if anything is still watching A's file, must not reach B, and the
        // stale A registration never runs again.
        drop(a_wr);
        for _ in 0..3 {
            r.poll(false);
        }
        assert_eq!(a_runs.get(), 0, "nothing was delivered to the stale registration");
        // Removing the stale registration does not disturb B's.
        r.remove_fd(a_id).unwrap();
        write_fd(&b_wr, b"again");
        assert!(r.poll(true));
        assert_eq!(b_runs.get(), 2);
        // A second registration of B's open fd is a double registration: EEXIST.
        let e = r.add_fd(n, FdHandler::new().on_read(|_, _| {})).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        r.remove_fd(b_id).unwrap();
        assert_eq!(r.fd_count(), 0);
    }

    fn a_doorbell_probe_answered_by_a_filter_falls_back_to_the_eventfd(r: &Reactor) {
        let backend = r.backend();
        std::thread::spawn(move || {
            // io_uring_register on fd -1 (the ring-message probe, and the message itself)
            // "succeeds" without reaching the kernel, as a seccomp filter returning errno 0
            // makes it; the ring's own registrations (on its fd) are untouched.
            tests::seccomp::answer_on_this_thread(libc::SYS_io_uring_register, u32::MAX, 0)
                .expect("seccomp filter");
            // And it is woken from another thread while it blocks. The wake must find the
            // reactor asleep; a slow machine (valgrind under load) may not get there before
            // it, so the delay doubles until it does.
            let mut delay = Duration::from_millis(20);
            loop {
                let r = Reactor::builder()
                    .backend(backend)
                    .build()
                    .expect("the reactor builds, with the eventfd as its doorbell");
                assert_eq!(r.wakeup(), reactor::Wakeup::EventFd);
                let ran = Arc::new(AtomicBool::new(false));
                let (h, ran2) = (r.handle(), ran.clone());
                let waker = std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    h.oneshot(move |_| ran2.store(true, Ordering::SeqCst)).unwrap();
                });
                let t0 = Instant::now();
                while !ran.load(Ordering::SeqCst) {
                    assert!(t0.elapsed() < Duration::from_secs(10), "never woken");
                    r.poll(true);
                }
                waker.join().unwrap();
                let st = r.stats();
                if st.blocking_waits > 0 {
                    assert!(st.eventfd_writes > 0, "{st:?}");
                    assert_eq!(st.ring_messages, 0);
                    break;
                }
                assert!(delay < Duration::from_secs(5), "the reactor never slept: {st:?}");
                delay *= 2;
            }
        })
        .join()
        .expect("the reactor's thread failed");
    }

    fn signal_storm_during_blocking_waits(r: &Reactor) {
        extern "C" fn nothing(_: libc::c_int) {}
        // SAFETY: a no-op handler for SIGUSR2 without SA_RESTART, so that waits see EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = nothing as *const () as usize;
            libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
        }
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as usize;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let killer = std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                // SAFETY: the target thread outlives this loop (joined before it returns).
                unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR2) };
                sent += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            sent
        });
        // A timer 30 ms out, and BHs scheduled from another thread now and then.
        let fired = Rc::new(Cell::new(0u32));
        let f2 = fired.clone();
        let t = r.timer(move |_| f2.set(f2.get() + 1));
        let t0 = Instant::now();
        t.arm_after(Duration::from_millis(30));
        let ran = Arc::new(AtomicUsize::new(0));
        let ran2 = ran.clone();
        let bh = Arc::new(r.bh(move |_| {
            ran2.fetch_add(1, Ordering::Relaxed);
        }));
        let bh2 = bh.clone();
                let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        let producer = std::thread::spawn(move || {
            for i in 0..10 {
                std::thread::sleep(Duration::from_millis(7));
                if i == 9 {
                    // Before the last schedule, so that the wakeup it causes sees the flag.
                    done2.store(true, Ordering::Release);
                }
                bh2.schedule();
            }
        });
        let mut progress_polls = 0;
                while fired.get() == 0 || !done.load(Ordering::Acquire) || bh.is_scheduled() {
            let before = (fired.get(), ran.load(Ordering::Relaxed));
            if r.poll(true) {
                progress_polls += 1;
                assert_ne!(before, (fired.get(), ran.load(Ordering::Relaxed)), "progress without work");
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "stuck");
        }
        producer.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        let sent = killer.join().unwrap();
        flush(r);
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert_eq!(fired.get(), 1, "the timer fired once, not early, not lost");
        assert!(ran.load(Ordering::Relaxed) >= 1);
        assert!(!bh.is_scheduled(), "no schedule left behind");
        assert!(progress_polls >= 2);
        assert!(sent > 20, "the storm happened: {sent} signals");
    }
}

/// A thread whose `io_uring_setup` fails with EPERM, as under a container runtime's seccomp
/// profile: `Auto` falls back to epoll and works; a forced io_uring says why it cannot start.
#[cfg(all(feature = "uring", feature = "epoll"))]
#[test]
fn io_uring_forbidden_by_seccomp() {
    std::thread::spawn(|| {
        tests::seccomp::deny_on_this_thread(&[libc::SYS_io_uring_setup], libc::EPERM).unwrap();
        let r = reactor::Builder::new()
            .backend(Backend::Auto)
            .build()
            .expect("Auto falls back to epoll");
        assert_eq!(r.backend(), Backend::Epoll);
        let ran = Rc::new(Cell::new(false));
        let r2 = ran.clone();
        r.oneshot(move |_| r2.set(true));
        let t = r.timer(|_| {});
        t.arm_after(Duration::from_millis(1));
        r.run_until(|| ran.get() && !t.is_armed());
        let e = reactor::Builder::new()
            .backend(Backend::Uring)
            .build()
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("seccomp") && msg.contains("EPERM"),
            "the error names the cause: {msg}"
        );
    })
    .join()
    .expect("seccomp thread");
}

/// `io_uring_setup` returning ENOSYS (no io_uring in this kernel) falls back as well.
#[cfg(all(feature = "uring", feature = "epoll"))]
#[test]
fn io_uring_missing_falls_back() {
    std::thread::spawn(|| {
        tests::seccomp::deny_on_this_thread(&[libc::SYS_io_uring_setup], libc::ENOSYS).unwrap();
        assert_eq!(Reactor::new().unwrap().backend(), Backend::Epoll);
        let e = reactor::Builder::new()
            .backend(Backend::Uring)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("ENOSYS"), "{e}");
    })
    .join()
    .expect("seccomp thread");
}

/// Runs the `fault-child` binary and returns its `key=value` lines.
fn child(what: &str) -> std::collections::HashMap<String, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fault-child"))
        .args(what.split(' '))
        .env_remove(reactor::BACKEND_ENV)
        .output()
        .expect("run fault-child");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fault-child {what} crashed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// With no fd left, creating a reactor fails with EMFILE (no panic, no partial reactor);
/// with just enough, it works.
#[test]
fn low_rlimit_nofile() {
    let res = child("nofile");
    let emfile = format!("err:{}:", libc::EMFILE);
    assert!(
        res["nofile-none-auto"].starts_with(&emfile),
        "{}",
        res["nofile-none-auto"]
    );
    #[cfg(feature = "epoll")]
    assert!(
        res["nofile-none-epoll"].starts_with(&emfile),
        "{}",
        res["nofile-none-epoll"]
    );
    #[cfg(feature = "uring")]
    assert!(
        res["nofile-none-uring"].starts_with(&format!("err:{}:", libc::EMFILE)),
        "{}",
        res["nofile-none-uring"]
    );
    assert!(
        res["nofile-two-auto"].starts_with("ok:"),
        "{}",
        res["nofile-two-auto"]
    );
    #[cfg(feature = "epoll")]
    assert_eq!(res["nofile-two-epoll"], "ok:epoll");
}

/// With RLIMIT_MEMLOCK at 0: `Auto` still gives a working reactor (io_uring memory is charged
/// to the memory cgroup since Linux 5.12, so the limit does not apply; on older kernels `Auto`
/// falls back to epoll), and a forced io_uring either works or names the limit.
#[test]
fn low_rlimit_memlock() {
    let res = child("memlock");
    assert!(
        res["memlock-auto"].starts_with("ok:"),
        "{}",
        res["memlock-auto"]
    );
    #[cfg(feature = "uring")]
    {
        let u = &res["memlock-uring"];
        assert!(
            u == "ok:uring" || (u.starts_with("err:12:") && u.contains("RLIMIT_MEMLOCK")),
            "{u}"
        );
    }
}

/// `fork` with a busy reactor (in the `fault-child` process: a test binary has threads).
mod fork {
    use super::*;

    backend_tests! {
        fn a_reactor_used_in_a_fork_child_fails_clearly_and_the_parent_goes_on(r: &Reactor) {
            let res = child(&format!("fork {}", r.backend()));
            for key in ["child-try-poll", "child-add-fd", "child-remove-fd"] {
                assert!(
                    res[key].starts_with("err:") && res[key].contains("fork()"),
                    "{key}: {}",
                    res[key]
                );
            }
            assert!(
                res["child-poll"].starts_with("panicked:") && res["child-poll"].contains("fork()"),
                "{}",
                res["child-poll"]
            );
            assert_eq!(res["child-new-reactor"], format!("ok:{}", r.backend()));
            assert_eq!(res["child-exit"], "0");
            assert_eq!(res["parent-fd-handler-ran"], "true");
            assert_eq!(res["parent-read"], "after fork");
        }
    }
}
