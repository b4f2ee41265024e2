//! fd handlers: level-triggering on pipes and socketpairs, interest changes, removal.

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;

use reactor::{FdHandler, FdId, Interest};
use tests::{backend_tests, flush, pipe, read_fd, write_fd};

fn reading_one_byte_per_call(
    r: &reactor::Reactor,
    rd: Rc<OwnedFd>,
) -> (Rc<RefCell<Vec<u8>>>, FdId) {
    let got = Rc::new(RefCell::new(Vec::new()));
    let got2 = got.clone();
    let id = r
        .add_fd(
            rd.as_raw_fd(),
            FdHandler::new().on_read(move |_, _| {
                let mut b = [0u8; 1];
                let n = read_fd(&rd, &mut b);
                got2.borrow_mut().extend_from_slice(&b[..n]);
            }),
        )
        .unwrap();
    (got, id)
}

backend_tests! {
    fn pipe_is_level_triggered(r: &Reactor) {
        let (rd, wr) = pipe().unwrap();
        let (got, id) = reading_one_byte_per_call(r, Rc::new(rd));
        assert!(!r.poll(false));
        write_fd(&wr, b"abc");
        // One byte per callback, one callback per iteration, until drained.
        assert!(r.poll(true));
        assert_eq!(&got.borrow()[..], b"a");
        assert!(r.poll(false));
        assert!(r.poll(false));
        assert_eq!(&got.borrow()[..], b"abc");
        assert!(!r.poll(false));
        r.remove_fd(id).unwrap();
    }

    fn socketpair_read_and_write_callbacks(r: &Reactor) {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = Rc::new(a);
        let reads = Rc::new(Cell::new(0));
        let writes = Rc::new(Cell::new(0));
        let (a2, reads2, writes2) = (a.clone(), reads.clone(), writes.clone());
        let id = r
            .add_fd(
                a.as_raw_fd(),
                FdHandler::new()
                    .on_read(move |_, _| {
                        let mut buf = [0u8; 16];
                        let _ = (&*a2).read(&mut buf);
                        reads2.set(reads2.get() + 1);
                    })
                    .on_write(move |r, id| {
                        writes2.set(writes2.get() + 1);
                        // Writable forever: turn write interest off after the first call.
                        r.set_fd_interest(id, Interest::READABLE).unwrap();
                    }),
            )
            .unwrap();
        assert!(r.poll(false));
        assert_eq!((reads.get(), writes.get()), (0, 1));
        assert!(!r.poll(false));
        b.write_all(b"x").unwrap();
        assert!(r.poll(true));
        assert_eq!((reads.get(), writes.get()), (1, 1));
        assert!(!r.poll(false));
        r.set_fd_interest(id, Interest::READABLE | Interest::WRITABLE).unwrap();
        assert!(r.poll(false));
        assert_eq!(writes.get(), 2);
        r.remove_fd(id).unwrap();
    }

    fn hangup_runs_the_read_callback(r: &Reactor) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = Rc::new(a);
        let eof = Rc::new(Cell::new(false));
        let (a2, eof2) = (a.clone(), eof.clone());
        r.add_fd(
            a.as_raw_fd(),
            FdHandler::new().on_read(move |r, id| {
                let mut buf = [0u8; 4];
                if (&*a2).read(&mut buf).unwrap() == 0 {
                    eof2.set(true);
                    r.remove_fd(id).unwrap();
                }
            }),
        )
        .unwrap();
        drop(b);
        r.run_until(|| eof.get());
        assert_eq!(r.fd_count(), 0);
    }

    fn remove_from_its_own_callback(r: &Reactor) {
        let (rd, wr) = pipe().unwrap();
        let n = Rc::new(Cell::new(0));
        let n2 = n.clone();
        r.add_fd(
            rd.as_raw_fd(),
            FdHandler::new().on_read(move |r, id| {
                n2.set(n2.get() + 1);
                r.remove_fd(id).unwrap();
                assert!(r.remove_fd(id).is_err(), "already removed");
            }),
        )
        .unwrap();
        write_fd(&wr, b"x");
        assert!(r.poll(true));
        assert_eq!(n.get(), 1);
        assert!(!r.poll(false), "removed: never again, although still readable");
        assert_eq!(n.get(), 1);
        assert_eq!(r.fd_count(), 0);
    }

    fn remove_another_handler_whose_event_is_pending(r: &Reactor) {
        // Two readable pipes; whichever callback runs first removes the other, which must then
        // not run although its event was already collected.
        let (rd1, wr1) = pipe().unwrap();
        let (rd2, wr2) = pipe().unwrap();
        let ids: Rc<RefCell<Vec<FdId>>> = Rc::new(RefCell::new(Vec::new()));
        let runs = Rc::new(Cell::new(0));
        for rd in [&rd1, &rd2] {
            let (ids2, runs2) = (ids.clone(), runs.clone());
            let id = r
                .add_fd(
                    rd.as_raw_fd(),
                    FdHandler::new().on_read(move |r, me| {
                        runs2.set(runs2.get() + 1);
                        for &other in ids2.borrow().iter().filter(|&&o| o != me) {
                            r.remove_fd(other).unwrap();
                        }
                        r.remove_fd(me).unwrap();
                    }),
                )
                .unwrap();
            ids.borrow_mut().push(id);
        }
        write_fd(&wr1, b"x");
        write_fd(&wr2, b"x");
        flush(r);
        assert_eq!(runs.get(), 1);
        assert_eq!(r.fd_count(), 0);
    }

    fn callbacks_are_dropped_after_the_outermost_dispatch(r: &Reactor) {
        struct Flag(Rc<Cell<bool>>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.set(true);
            }
        }
        let (rd, wr) = pipe().unwrap();
        let dropped = Rc::new(Cell::new(false));
        let flag = Flag(dropped.clone());
        let dropped2 = dropped.clone();
        r.add_fd(
            rd.as_raw_fd(),
            FdHandler::new().on_read(move |r, id| {
                let _ = &flag;
                r.remove_fd(id).unwrap();
                r.poll(false); // nested: still inside the outermost dispatch
                assert!(!dropped2.get(), "freed while its caller still runs");
            }),
        )
        .unwrap();
        write_fd(&wr, b"x");
        assert!(r.poll(false));
        assert!(dropped.get(), "freed when the outermost poll ended");
    }

    fn remove_outside_poll_drops_callbacks_at_once(r: &Reactor) {
        let (rd, _wr) = pipe().unwrap();
        let marker = Rc::new(());
        let m2 = marker.clone();
        let id = r.add_fd(rd.as_raw_fd(), FdHandler::new().on_read(move |_, _| { let _ = &m2; })).unwrap();
        assert_eq!(Rc::strong_count(&marker), 2);
        r.remove_fd(id).unwrap();
        assert_eq!(Rc::strong_count(&marker), 1);
    }

    fn interest_none_pauses_and_resumes(r: &Reactor) {
        let (rd, wr) = pipe().unwrap();
        let rd = Rc::new(rd);
        let (got, id) = reading_one_byte_per_call(r, rd.clone());
        r.set_fd_interest(id, Interest::NONE).unwrap();
        write_fd(&wr, b"xy");
        assert!(!r.poll(false));
        assert!(!r.poll(false));
        assert!(got.borrow().is_empty());
        r.set_fd_interest(id, Interest::READABLE).unwrap();
        flush(r);
        assert_eq!(&got.borrow()[..], b"xy");
        r.remove_fd(id).unwrap();
    }

    fn fd_can_be_registered_again_after_removal(r: &Reactor) {
        let (rd, wr) = pipe().unwrap();
        let rd = Rc::new(rd);
        for round in 0..3u8 {
            let (got, id) = reading_one_byte_per_call(r, rd.clone());
            write_fd(&wr, &[round]);
            assert!(r.poll(true));
            assert_eq!(&got.borrow()[..], &[round]);
            r.remove_fd(id).unwrap();
            assert!(!r.poll(false));
        }
    }

    fn many_fds_all_dispatched(r: &Reactor) {
        let pairs: Vec<_> = (0..200).map(|_| UnixStream::pair().unwrap()).collect();
        let seen = Rc::new(RefCell::new(vec![0u32; 200]));
        for (i, (a, b)) in pairs.iter().enumerate() {
            a.set_nonblocking(true).unwrap();
            let a2 = a.try_clone().unwrap();
            let seen2 = seen.clone();
            r.add_fd(
                a.as_raw_fd(),
                FdHandler::new().on_read(move |_, _| {
                    let mut buf = [0u8; 8];
                    let _ = (&a2).read(&mut buf);
                    seen2.borrow_mut()[i] += 1;
                }),
            )
            .unwrap();
            (&*b).write_all(b"z").unwrap();
        }
        flush(r);
        assert!(seen.borrow().iter().all(|&n| n == 1), "{:?}", seen.borrow());
        assert_eq!(r.fd_count(), 200);
    }
}
