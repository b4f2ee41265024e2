//! Nested polls: `poll` called from inside callbacks.

use std::cell::{Cell, RefCell};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use reactor::{Bh, FdHandler};
use tests::{backend_tests, flush, pipe, read_fd, write_fd};

backend_tests! {
    fn nested_poll_drains_the_outer_slice_first(r: &Reactor) {
        // A, B, C are scheduled together; A schedules D and polls nested. The nested poll must
        // run B and C (taken by the outer poll) before D (its own), and the outer poll must not
        // run B or C again.
        let order = Rc::new(RefCell::new(Vec::new()));
        let d = {
            let o = order.clone();
            Rc::new(r.bh(move |_| o.borrow_mut().push('D')))
        };
        let mk = |name: char| {
            let (o, d) = (order.clone(), d.clone());
            r.bh(move |r| {
                o.borrow_mut().push(name);
                if name == 'A' {
                    d.schedule();
                    assert!(r.poll(false), "nested poll made progress");
                }
            })
        };
        let (a, b, c) = (mk('A'), mk('B'), mk('C'));
        for bh in [&a, &b, &c] {
            bh.schedule();
        }
        assert!(r.poll(false));
        assert_eq!(*order.borrow(), vec!['A', 'B', 'C', 'D']);
        assert!(!r.poll(false));
    }

    fn a_bh_never_runs_reentrantly(r: &Reactor) {
        // The BH reschedules itself and polls nested: the nested poll must not run it again
        // while it runs; the run happens after it returns.
        let depth = Rc::new(Cell::new(0));
        let runs = Rc::new(Cell::new(0));
        let me: Rc<RefCell<Option<Bh>>> = Rc::new(RefCell::new(None));
        let (depth2, runs2, me2) = (depth.clone(), runs.clone(), me.clone());
        let bh = r.bh(move |r| {
            assert_eq!(depth2.get(), 0, "re-entered");
            depth2.set(1);
            runs2.set(runs2.get() + 1);
            if runs2.get() == 1 {
                me2.borrow().as_ref().unwrap().schedule();
                r.poll(false);
                r.poll(false);
            }
            depth2.set(0);
        });
        bh.schedule();
        *me.borrow_mut() = Some(bh);
        flush(r);
        assert_eq!(runs.get(), 2, "the postponed run happened, once");
        me.borrow_mut().take();
    }

    fn nested_poll_from_an_fd_callback_dispatches_other_fds_once(r: &Reactor) {
        let (rd1, wr1) = pipe().unwrap();
        let (rd2, wr2) = pipe().unwrap();
        let rd1 = Rc::new(rd1);
        let rd2 = Rc::new(rd2);
        let log = Rc::new(RefCell::new(Vec::new()));
        let (l1, l2) = (log.clone(), log.clone());
        let (rd1b, rd2b) = (rd1.clone(), rd2.clone());
        r.add_fd(
            rd1.as_raw_fd(),
            FdHandler::new().on_read(move |r, _| {
                let mut b = [0u8; 8];
                read_fd(&rd1b, &mut b);
                l1.borrow_mut().push(1);
                while r.poll(false) {}
            }),
        )
        .unwrap();
        r.add_fd(
            rd2.as_raw_fd(),
            FdHandler::new().on_read(move |_, _| {
                let mut b = [0u8; 8];
                read_fd(&rd2b, &mut b);
                l2.borrow_mut().push(2);
            }),
        )
        .unwrap();
        write_fd(&wr1, b"x");
        write_fd(&wr2, b"y");
        flush(r);
        let mut got = log.borrow().clone();
        got.sort();
        assert_eq!(got, vec![1, 2], "each callback once for its one event");
    }

    fn nested_poll_skips_the_running_fd_callback(r: &Reactor) {
        // The callback polls nested before consuming its data: its fd is still readable, but it
        // must not be re-entered; it runs again only after returning, if still readable.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = Rc::new(a);
        let depth = Rc::new(Cell::new(0));
        let runs = Rc::new(Cell::new(0));
        let (a2, depth2, runs2) = (a.clone(), depth.clone(), runs.clone());
        r.add_fd(
            a.as_raw_fd(),
            FdHandler::new().on_read(move |r, _| {
                assert_eq!(depth2.get(), 0, "re-entered");
                depth2.set(1);
                runs2.set(runs2.get() + 1);
                r.poll(false);
                let mut buf = [0u8; 8];
                let _ = (&*a2).read(&mut buf);
                depth2.set(0);
            }),
        )
        .unwrap();
        std::io::Write::write_all(&mut &b, b"data").unwrap();
        flush(r);
        assert_eq!(runs.get(), 1);
    }

    fn nested_blocking_poll_is_woken(r: &Reactor) {
        // A blocking poll nested in a BH, woken by a timer armed by that BH.
        let fired = Rc::new(Cell::new(false));
        let f2 = fired.clone();
        let t = Rc::new(r.timer(move |_| f2.set(true)));
        let (t2, f3) = (t.clone(), fired.clone());
        let bh = r.bh(move |r| {
            t2.arm_after(std::time::Duration::from_millis(5));
            r.run_until(|| f3.get());
        });
        bh.schedule();
        assert!(r.poll(false));
        assert!(fired.get());
    }
}
