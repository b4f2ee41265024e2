//! The loop's failure policy: errors of the fd monitor, injected as if the kernel returned
//! them, never panic `poll`/`run`, are returned by `try_poll`/`try_run`, lose no work, and a
//! monitor that keeps failing costs no CPU spin. A busy io_uring (`EAGAIN`/`EBUSY`) is retried
//! by the backend before anything reaches the loop.

use std::cell::Cell;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use reactor::{Backend, FdHandler, Reactor};
use tests::{backend_tests, pipe, write_fd};

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A scheduled BH that counts its runs (keep the `Bh`: dropping it deletes it).
fn scheduled(r: &Reactor) -> (reactor::Bh, Rc<Cell<u32>>) {
    let ran = Rc::new(Cell::new(0));
    let ran2 = ran.clone();
    let bh = r.bh(move |_| ran2.set(ran2.get() + 1));
    bh.schedule();
    (bh, ran)
}

backend_tests! {
    fn try_poll_returns_the_error_and_loses_nothing(r: &Reactor) {
        let ran = Rc::new(Cell::new(false));
        let ran2 = ran.clone();
        let bh = r.bh(move |_| ran2.set(true));
        bh.schedule();
        r.inject_monitor_errors(libc::EBADF, 1);
        let e = r.try_poll(true).unwrap_err();
        assert_eq!(e.raw_os_error(), None, "wrapped with context");
        assert!(e.to_string().contains("fd monitor failed"), "{e}");
        assert!(e.to_string().contains(&r.backend().to_string()), "{e}");
        assert!(!ran.get(), "a failed try_poll runs nothing");
        assert_eq!(r.stats().monitor_errors, 1);
        // The next iteration goes on normally and runs what was pending.
        assert!(r.try_poll(true).unwrap());
        assert!(ran.get());
    }

    fn poll_survives_and_still_runs_bhs_and_timers(r: &Reactor) {
        r.inject_monitor_errors(libc::ENOMEM, 3);
        let (_bh, ran) = scheduled(r);
        let fired = Rc::new(Cell::new(false));
        let f2 = fired.clone();
        let t = r.timer(move |_| f2.set(true));
        t.arm_after(Duration::from_millis(5));
        let t0 = Instant::now();
        while !(fired.get() && ran.get() > 0) {
            r.poll(true);
            assert!(t0.elapsed() < Duration::from_secs(10), "work lost");
        }
        // (io_uring makes no system call for a zero wait with nothing to submit, so not every
        // iteration meets an injected error.)
        let errors = r.stats().monitor_errors;
        assert!((1..=3).contains(&errors), "{errors}");
        r.inject_monitor_errors(0, 0);
        // Working again: a blocking poll that finds an fd event.
        let (rd, wr) = pipe().unwrap();
        let seen = Rc::new(Cell::new(false));
        let s2 = seen.clone();
        let id = r
            .add_fd(rd.as_raw_fd(), FdHandler::new().on_read(move |_, _| s2.set(true)))
            .unwrap();
        write_fd(&wr, b"x");
        while !seen.get() {
            r.poll(true);
        }
        r.remove_fd(id).unwrap();
    }

    fn fd_events_are_seen_after_the_monitor_recovers(r: &Reactor) {
        let (rd, wr) = pipe().unwrap();
        let seen = Rc::new(Cell::new(0u32));
        let s2 = seen.clone();
        let id = r
            .add_fd(rd.as_raw_fd(), FdHandler::new().on_read(move |_, _| s2.set(s2.get() + 1)))
            .unwrap();
        write_fd(&wr, b"x");
        r.inject_monitor_errors(libc::EBADF, 2);
        assert!(r.try_poll(false).is_err());
        assert!(r.try_poll(false).is_err());
        assert_eq!(seen.get(), 0);
        // Level-triggered: the byte still waits, and is reported once the monitor works.
        let t0 = Instant::now();
        while seen.get() == 0 {
            r.try_poll(true).unwrap();
            assert!(t0.elapsed() < Duration::from_secs(10));
        }
        r.remove_fd(id).unwrap();
    }

    fn a_monitor_that_keeps_failing_costs_no_spin(r: &Reactor) {
        r.inject_monitor_errors(libc::EBADF, u32::MAX);
        let h = r.handle();
        // Stop from another thread after 300 ms of failing waits.
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            h.stop().unwrap();
        });
        let (c0, t0) = (thread_cpu(), Instant::now());
        r.run();
        let (cpu, wall) = (thread_cpu() - c0, t0.elapsed());
        stopper.join().unwrap();
        r.inject_monitor_errors(0, 0);
        let errors = r.stats().monitor_errors;
        assert!(errors >= 3, "{errors} failed waits");
        // Pauses of 1, 2, 4, ... 100 ms: a handful of failed waits, not a busy loop.
        assert!(errors < 100, "{errors} failed waits in {wall:?}: the loop spins");
        assert!(cpu < wall / 2, "{cpu:?} of CPU in {wall:?}");
    }

    fn try_run_returns_the_first_error(r: &Reactor) {
        r.inject_monitor_errors(libc::EBADF, 1);
        let e = r.try_run().unwrap_err();
        assert!(e.to_string().contains("fd monitor failed"), "{e}");
        r.handle().oneshot(|r| r.stop()).unwrap();
        r.try_run().unwrap();
        r.inject_monitor_errors(libc::EBADF, 1);
        let e = r.try_run_until(|| false).unwrap_err();
        assert!(e.to_string().contains("fd monitor failed"), "{e}");
    }

    fn a_briefly_busy_kernel_is_retried(r: &Reactor) {
        // Two EAGAINs and then two EBUSYs, as io_uring_enter returns when it needs reaping.
        for errno in [libc::EAGAIN, libc::EBUSY] {
            let (_bh, ran) = scheduled(r);
            r.inject_monitor_errors(errno, 2);
            let res = r.try_poll(true);
            match r.backend() {
                // Paused out and retried inside the backend: the loop sees nothing.
                Backend::Uring => {
                    assert!(res.unwrap(), "{errno}");
                    assert_eq!(ran.get(), 1);
                }
                // epoll_wait never returns these; when it does, the loop is told.
                _ => {
                    assert!(res.is_err());
                    r.inject_monitor_errors(0, 0);
                    while ran.get() == 0 {
                        r.try_poll(true).unwrap();
                    }
                }
            }
        }
        if r.backend() == Backend::Uring {
            assert_eq!(r.stats().monitor_errors, 0);
        }
    }

    fn a_kernel_busy_for_too_long_is_an_error(r: &Reactor) {
        let _bh = scheduled(r);
        r.inject_monitor_errors(libc::EAGAIN, 1000);
        let t0 = Instant::now();
        let e = r.try_poll(true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
        // io_uring waits out a busy kernel for about 13 ms before giving up.
        assert!(t0.elapsed() < Duration::from_secs(5));
        r.inject_monitor_errors(0, 0);
        assert!(r.try_poll(true).unwrap());
    }
}
