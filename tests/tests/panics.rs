//! A panicking callback propagates out of `poll`, and the reactor goes on.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::time::Duration;

use reactor::FdHandler;
use tests::{backend_tests, flush, pipe, read_fd, write_fd};

fn poll_panics(r: &reactor::Reactor) -> bool {
    catch_unwind(AssertUnwindSafe(|| r.poll(false))).is_err()
}

backend_tests! {
    fn panicking_bh(r: &Reactor) {
        let n = Rc::new(Cell::new(0));
        let n2 = n.clone();
        let bad = r.bh(move |_| {
            n2.set(n2.get() + 1);
            if n2.get() == 1 {
                panic!("first run panics");
            }
        });
        let (m, m2) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        let m3 = m2.clone();
        let _ = &m;
        let good = r.bh(move |_| m3.set(m3.get() + 1));
        bad.schedule();
        good.schedule();
        assert!(poll_panics(r));
        assert_eq!(n.get(), 1);
        // The rest of the batch runs in the next poll, and the panicking BH is still usable.
        flush(r);
        assert_eq!(m2.get(), 1);
        bad.schedule();
        assert!(r.poll(false));
        assert_eq!(n.get(), 2);
    }

    fn panicking_oneshot(r: &Reactor) {
        r.oneshot(|_| panic!("boom"));
        assert!(poll_panics(r));
        assert!(!r.poll(false));
    }

    fn panicking_fd_callback(r: &Reactor) {
        let (rd, wr) = pipe().unwrap();
        let rd = Rc::new(rd);
        let n = Rc::new(Cell::new(0));
        let (rd2, n2) = (rd.clone(), n.clone());
        let id = r
            .add_fd(
                rd.as_raw_fd(),
                FdHandler::new().on_read(move |_, _| {
                    n2.set(n2.get() + 1);
                    if n2.get() == 1 {
                        panic!("fd callback panics");
                    }
                    let mut b = [0u8; 8];
                    read_fd(&rd2, &mut b);
                }),
            )
            .unwrap();
        write_fd(&wr, b"x");
        assert!(poll_panics(r));
        // Still registered, still level-triggered: runs again and drains.
        assert!(r.poll(true));
        assert_eq!(n.get(), 2);
        assert!(!r.poll(false));
        r.remove_fd(id).unwrap();
    }

    fn panicking_timer(r: &Reactor) {
        let n = Rc::new(Cell::new(0));
        let n2 = n.clone();
        let t = r.timer(move |_| {
            n2.set(n2.get() + 1);
            if n2.get() == 1 {
                panic!("timer panics");
            }
        });
        t.arm_after(Duration::ZERO);
        assert!(poll_panics(r));
        t.arm_after(Duration::ZERO);
        assert!(r.poll(false));
        assert_eq!(n.get(), 2);
    }

    fn panic_inside_a_nested_poll(r: &Reactor) {
        let n = Rc::new(Cell::new(0));
        let n2 = n.clone();
        r.oneshot(move |r| {
            r.oneshot(|_| panic!("inner"));
            let _ = catch_unwind(AssertUnwindSafe(|| r.poll(false)));
            n2.set(1);
        });
        assert!(r.poll(false));
        assert_eq!(n.get(), 1);
        assert!(reactor::Reactor::with_current(|_| ()).is_none(), "current reactor restored");
        assert!(!r.poll(false));
    }
}
