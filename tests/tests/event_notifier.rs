//! Event notifiers registered as fd handlers (test-aio.c's event notifier tests).

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use reactor::{EventNotifier, FdHandler};
use tests::{backend_tests, flush};

/// A notifier whose read callback counts runs and, if `clear`, clears it.
fn counting(
    r: &reactor::Reactor,
    clear: bool,
) -> (Rc<EventNotifier>, Rc<Cell<u32>>, reactor::FdId) {
    let e = Rc::new(EventNotifier::new().unwrap());
    let n = Rc::new(Cell::new(0));
    let (e2, n2) = (e.clone(), n.clone());
    let id = r
        .add_fd(
            e.as_raw_fd(),
            FdHandler::new().on_read(move |_, _| {
                n2.set(n2.get() + 1);
                if clear {
                    assert!(e2.test_and_clear());
                }
            }),
        )
        .unwrap();
    (e, n, id)
}

backend_tests! {
    fn set_event_notifier_add_remove(r: &Reactor) {
        let (_e, n, id) = counting(r, true);
        assert!(!r.poll(false));
        r.remove_fd(id).unwrap();
        assert!(!r.poll(false));
        assert_eq!(n.get(), 0);
        assert_eq!(r.fd_count(), 0);
    }

    fn wait_event_notifier(r: &Reactor) {
        let (e, n, id) = counting(r, true);
        assert!(!r.poll(false));
        e.set().unwrap();
        assert!(r.poll(false));
        assert_eq!(n.get(), 1);
        assert!(!r.poll(false));
        assert_eq!(n.get(), 1);
        e.set().unwrap();
        assert!(r.poll(true), "a blocking poll wakes for the set notifier");
        assert_eq!(n.get(), 2);
        r.remove_fd(id).unwrap();
        e.set().unwrap();
        assert!(!r.poll(false), "removed: no callback");
        assert_eq!(n.get(), 2);
    }

    fn flush_event_notifier_is_level_triggered(r: &Reactor) {
        // The callback clears the notifier and re-sets it until it has run 10 times: exactly
        // one callback per set, however the iterations fall.
        let e = Rc::new(EventNotifier::new().unwrap());
        let n = Rc::new(Cell::new(0));
        let (e2, n2) = (e.clone(), n.clone());
        let id = r
            .add_fd(
                e.as_raw_fd(),
                FdHandler::new().on_read(move |_, _| {
                    assert!(e2.test_and_clear(), "run only while set");
                    n2.set(n2.get() + 1);
                    if n2.get() < 10 {
                        e2.set().unwrap();
                    }
                }),
            )
            .unwrap();
        e.set().unwrap();
        assert!(r.poll(false));
        assert_eq!(n.get(), 1);
        assert!(flush(r) >= 1);
        assert_eq!(n.get(), 10);
        assert!(!r.poll(false));
        r.remove_fd(id).unwrap();
    }

    fn a_callback_that_does_not_clear_runs_every_iteration(r: &Reactor) {
        let (e, n, id) = counting(r, false);
        e.set().unwrap();
        for i in 1..=5 {
            assert!(r.poll(false));
            assert_eq!(n.get(), i, "level-triggered: once per iteration while set");
        }
        assert!(e.test_and_clear());
        assert!(!r.poll(false));
        r.remove_fd(id).unwrap();
    }

    fn wait_event_notifier_without_flush_callback(r: &Reactor) {
        // Two notifiers: the first is set, the second never; only the first's callback runs,
        // and the second stays quiet across many iterations.
        let (e1, n1, id1) = counting(r, true);
        let (_e2, n2, id2) = counting(r, true);
        e1.set().unwrap();
        assert!(r.poll(true));
        assert_eq!((n1.get(), n2.get()), (1, 0));
        for _ in 0..3 {
            assert!(!r.poll(false));
        }
        assert_eq!((n1.get(), n2.get()), (1, 0));
        r.remove_fd(id1).unwrap();
        r.remove_fd(id2).unwrap();
    }
}
