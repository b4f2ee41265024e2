//! Driving the reactor from a foreign loop: its fd is readable when a BH is scheduled from
//! another thread, when an fd handler is ready, and when a timer is due.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use reactor::{FdHandler, Reactor};
use tests::{backend_tests, pipe, read_fd, write_fd};

/// poll(2) on the reactor's fd for up to `ms`; whether it became readable.
fn readable_within(r: &Reactor, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: r.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

backend_tests! {
    fn readable_when_a_bh_is_scheduled_from_another_thread(r: &Reactor) {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ran2 = ran.clone();
        let bh = std::sync::Arc::new(r.bh(move |_| ran2.store(true, std::sync::atomic::Ordering::SeqCst)));
        assert_eq!(r.prepare_external_wait(), None, "nothing bounds the wait");
        assert!(!readable_within(r, 20), "nothing to do yet");
        let bh2 = bh.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            bh2.schedule();
        });
        assert!(readable_within(r, 5000), "the schedule woke the fd");
        t.join().unwrap();
        assert!(r.poll(false));
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
        assert!(r.stats().wakeups() >= 1);
    }

    fn readable_when_an_fd_handler_is_ready(r: &Reactor) {
        let (rd, wr) = pipe().unwrap();
        let rd = Rc::new(rd);
        let n = Rc::new(Cell::new(0));
        let (rd2, n2) = (rd.clone(), n.clone());
        let id = r
            .add_fd(
                rd.as_raw_fd(),
                FdHandler::new().on_read(move |_, _| {
                    let mut b = [0u8; 8];
                    read_fd(&rd2, &mut b);
                    n2.set(n2.get() + 1);
                }),
            )
            .unwrap();
        assert_eq!(r.prepare_external_wait(), None);
        assert!(!readable_within(r, 20));
        write_fd(&wr, b"x");
        assert!(readable_within(r, 5000), "the ready pipe woke the fd");
        assert!(r.poll(false));
        assert_eq!(n.get(), 1);
        r.remove_fd(id).unwrap();
    }

    fn readable_when_a_timer_is_due(r: &Reactor) {
        let fired = Rc::new(Cell::new(false));
        let f2 = fired.clone();
        let t = r.timer(move |_| f2.set(true));
        // A slow machine (valgrind, a loaded core) can pass the deadline inside the first poll, so
        // the timer fires before the foreign wait; then try again with a deadline twice as far.
        let mut delay = Duration::from_millis(30);
        loop {
            let t0 = Instant::now();
            t.arm_after(delay);
            // Armed outside a poll, the deadline reaches the reactor through a BH: there is work
            // first, and the wait comes after it.
            assert_eq!(r.prepare_external_wait(), Some(Duration::ZERO));
            r.poll(false);
            if fired.get() {
                assert!(t0.elapsed() >= delay, "fired early: {:?}", t0.elapsed());
                assert!(delay < Duration::from_secs(8), "the machine never let a poll finish before the deadline");
                fired.set(false);
                delay *= 2;
                continue;
            }
            let timeout = r.prepare_external_wait().expect("the timer bounds the wait");
            assert!(timeout <= delay);
            // Wait without using the timeout: the fd itself must wake at the deadline.
            assert!(readable_within(r, 5000 + delay.as_millis() as i32), "the timerfd woke the fd");
            assert!(t0.elapsed() >= delay - Duration::from_millis(1), "not early: {:?}", t0.elapsed());
            r.poll(false);
            assert!(fired.get());
            break;
        }
    }

    fn pending_work_means_no_wait_and_a_driven_loop_runs_everything(r: &Reactor) {
        r.oneshot(|_| {});
        assert_eq!(r.prepare_external_wait(), Some(Duration::ZERO));
        assert!(r.poll(false));
        // A small foreign loop, as in the documentation, driven to completion.
        let h = r.handle();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c2 = count.clone();
        std::thread::spawn(move || {
            for _ in 0..50 {
                let c3 = c2.clone();
                h.oneshot(move |_| {
                    c3.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                })
                .unwrap();
                std::thread::sleep(Duration::from_micros(300));
            }
            h.stop().unwrap();
        });
        let t0 = Instant::now();
        loop {
            let t = r.prepare_external_wait();
            let ms = t.map_or(-1, |t| t.as_millis().min(1000) as i32);
            readable_within(r, ms);
            r.poll(false);
            if r.stop_requested() {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "the driven loop stalled");
        }
        r.poll(false);
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 50);
    }
}
