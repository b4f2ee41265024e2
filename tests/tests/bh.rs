//! Bottom halves: the behaviours of QEMU's tests/unit/test-aio.c and the BH rules.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use reactor::Bh;
use tests::{backend_tests, flush};

fn counter() -> (Rc<Cell<u32>>, Rc<Cell<u32>>) {
    let c = Rc::new(Cell::new(0));
    (c.clone(), c)
}

backend_tests! {
    fn notify_alone_is_not_progress(r: &Reactor) {
        assert!(!r.poll(false));
        r.handle().notify().unwrap();
        assert!(!r.poll(true), "a wakeup by notification alone is not progress");
        assert!(!r.poll(false));
    }

    fn bh_schedule(r: &Reactor) {
        let (n, n2) = counter();
        let bh = r.bh(move |_| n2.set(n2.get() + 1));
        assert!(!bh.is_scheduled());
        bh.schedule();
        assert!(bh.is_scheduled());
        assert!(r.poll(true));
        assert_eq!(n.get(), 1);
        assert!(!bh.is_scheduled());
        assert!(!r.poll(false));
        assert_eq!(n.get(), 1);
    }

    fn bh_schedule_twice_runs_once(r: &Reactor) {
        let (n, n2) = counter();
        let bh = r.bh(move |_| n2.set(n2.get() + 1));
        bh.schedule();
        bh.schedule();
        assert!(r.poll(false));
        assert_eq!(n.get(), 1);
        assert!(!r.poll(false));
        assert_eq!(n.get(), 1);
    }

    fn schedule_after_schedule_idle_is_an_ordinary_schedule(r: &Reactor) {
        let (n, n2) = counter();
        let bh = r.bh(move |_| n2.set(n2.get() + 1));
        bh.schedule_idle();
        bh.schedule();
        assert!(r.poll(false), "upgraded: counts as progress");
        assert_eq!(n.get(), 1);
        bh.schedule();
        bh.schedule_idle();
        assert!(r.poll(false), "an idle schedule does not downgrade a pending ordinary one");
        assert_eq!(n.get(), 2);
    }

    fn bh_schedule10_runs_once_per_poll(r: &Reactor) {
        // The BH reschedules itself until it has run 10 times: one run per iteration, because a
        // BH scheduled while BHs run waits for the next iteration.
        let (n, n2) = counter();
        let slot: Rc<RefCell<Option<Bh>>> = Rc::new(RefCell::new(None));
        let slot2 = slot.clone();
        let bh = r.bh(move |_| {
            n2.set(n2.get() + 1);
            if n2.get() < 10 {
                slot2.borrow().as_ref().unwrap().schedule();
            }
        });
        bh.schedule();
        *slot.borrow_mut() = Some(bh);
        assert!(r.poll(false));
        assert_eq!(n.get(), 1);
        assert!(r.poll(true));
        assert_eq!(n.get(), 2);
        while n.get() < 10 {
            let before = n.get();
            assert!(r.poll(true));
            assert_eq!(n.get(), before + 1, "exactly one run per poll");
        }
        assert!(!r.poll(false));
        assert_eq!(n.get(), 10);
        slot.borrow_mut().take();
    }

    fn bh_cancel(r: &Reactor) {
        let (n, n2) = counter();
        let bh = r.bh(move |_| n2.set(n2.get() + 1));
        bh.schedule();
        bh.cancel();
        assert!(!bh.is_scheduled());
        assert!(!r.poll(false));
        assert_eq!(n.get(), 0);
        bh.schedule();
        assert!(r.poll(false));
        assert_eq!(n.get(), 1);
    }

    fn bh_delete(r: &Reactor) {
        let (n, n2) = counter();
        let bh = r.bh(move |_| n2.set(n2.get() + 1));
        bh.schedule();
        drop(bh);
        assert!(!r.poll(false), "a deleted BH never runs");
        assert_eq!(n.get(), 0);
        assert_eq!(r.bh_count(), 0, "and is freed");
    }

    fn bh_delete_from_callback(r: &Reactor) {
        let (n, n2) = counter();
        let slot: Rc<RefCell<Option<Bh>>> = Rc::new(RefCell::new(None));
        let slot2 = slot.clone();
        let bh = r.bh(move |_| {
            n2.set(n2.get() + 1);
            slot2.borrow_mut().take(); // deletes the running BH
        });
        bh.schedule();
        *slot.borrow_mut() = Some(bh);
        assert!(r.poll(false));
        assert_eq!(n.get(), 1);
        assert!(slot.borrow().is_none());
        flush(r);
        assert_eq!(n.get(), 1);
        assert_eq!(r.bh_count(), 0);
    }

    fn bh_delete_from_callback_many(r: &Reactor) {
        // Four BHs; the 1st and 3rd delete themselves; the 2nd and 4th reschedule themselves
        // until they have run 2 times.
        let slots: Rc<RefCell<Vec<Option<Bh>>>> = Rc::new(RefCell::new(Vec::new()));
        let runs = Rc::new(RefCell::new([0u32; 4]));
        for i in 0..4 {
            let (slots2, runs2) = (slots.clone(), runs.clone());
            let bh = r.bh(move |_| {
                runs2.borrow_mut()[i] += 1;
                if i % 2 == 0 {
                    slots2.borrow_mut()[i].take();
                } else if runs2.borrow()[i] < 2 {
                    slots2.borrow()[i].as_ref().unwrap().schedule();
                }
            });
            slots.borrow_mut().push(Some(bh));
        }
        for s in slots.borrow().iter() {
            s.as_ref().unwrap().schedule();
        }
        assert!(r.poll(false));
        assert_eq!(*runs.borrow(), [1, 1, 1, 1]);
        assert!(slots.borrow()[0].is_none() && slots.borrow()[2].is_none());
        flush(r);
        assert_eq!(*runs.borrow(), [1, 2, 1, 2]);
        assert_eq!(r.bh_count(), 2);
        slots.borrow_mut().clear();
        flush(r);
        assert_eq!(r.bh_count(), 0);
    }

    fn bh_flush(r: &Reactor) {
        let (n, n2) = counter();
        let bh = r.bh(move |_| n2.set(n2.get() + 1));
        bh.schedule();
        assert_eq!(flush(r), 1);
        assert_eq!(n.get(), 1);
    }

    fn bh_scheduled_by_another_bh_runs_next_iteration(r: &Reactor) {
        let (n, n2) = counter();
        let second = Rc::new(r.bh(move |_| n2.set(n2.get() + 1)));
        let second2 = second.clone();
        let first = r.bh(move |_| second2.schedule());
        first.schedule();
        assert!(r.poll(false));
        assert_eq!(n.get(), 0, "scheduled during dispatch: not in this iteration");
        assert!(r.poll(false));
        assert_eq!(n.get(), 1);
    }

    fn bhs_run_in_schedule_order(r: &Reactor) {
        let order = Rc::new(RefCell::new(Vec::new()));
        let bhs: Vec<Bh> = (0..5)
            .map(|i| {
                let o = order.clone();
                r.bh(move |_| o.borrow_mut().push(i))
            })
            .collect();
        for i in [3, 1, 4, 0, 2] {
            bhs[i].schedule();
        }
        assert!(r.poll(false));
        assert_eq!(*order.borrow(), vec![3, 1, 4, 0, 2]);
    }

    fn idle_bh_is_not_progress_and_bounds_the_wait(r: &Reactor) {
        let (n, n2) = counter();
        let bh = r.bh(move |_| n2.set(n2.get() + 1));
        bh.schedule_idle();
        let t0 = std::time::Instant::now();
        assert!(!r.poll(true), "idle BHs are not progress");
        assert_eq!(n.get(), 1);
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "the wait was bounded");
    }

    fn oneshot_runs_once_and_is_freed(r: &Reactor) {
        let (n, n2) = counter();
        let dropped = Rc::new(Cell::new(false));
        struct OnDrop(Rc<Cell<bool>>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.set(true);
            }
        }
        let guard = OnDrop(dropped.clone());
        r.oneshot(move |_| {
            let _g = guard;
            n2.set(n2.get() + 1);
        });
        assert!(r.poll(false));
        assert_eq!(n.get(), 1);
        assert!(dropped.get());
        assert!(!r.poll(false));
    }

    fn oneshots_from_other_threads(r: &Reactor) {
        let n = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (h, n) = (r.handle(), n.clone());
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        let n = n.clone();
                        h.oneshot(move |_| {
                            n.fetch_add(1, Ordering::Relaxed);
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        r.run_until(|| n.load(Ordering::Relaxed) == 400);
        for t in threads {
            t.join().unwrap();
        }
        flush(r);
        assert_eq!(n.load(Ordering::Relaxed), 400);
    }

    fn bh_dropped_on_another_thread_frees_its_callback_at_home(r: &Reactor) {
        let home = std::thread::current().id();
        struct CheckThread(std::thread::ThreadId, Rc<Cell<bool>>);
        impl Drop for CheckThread {
            fn drop(&mut self) {
                assert_eq!(std::thread::current().id(), self.0, "callback dropped off its thread");
                self.1.set(true);
            }
        }
        let dropped = Rc::new(Cell::new(false));
        let guard = CheckThread(home, dropped.clone());
        let bh = r.bh(move |_| {
            let _ = &guard;
        });
        std::thread::spawn(move || {
            bh.schedule();
            drop(bh);
        })
        .join()
        .unwrap();
        assert!(!r.poll(true), "deleted before it could run: nothing ran");
        assert!(dropped.get());
        assert_eq!(r.bh_count(), 0);
    }

    fn bh_scheduled_from_another_thread_wakes_a_sleeping_reactor(r: &Reactor) {
        // Through each doorbell the backend has: on io_uring a ring message (Linux 6.13) and
        // the eventfd; on epoll the eventfd.
        for wakeup in [reactor::Wakeup::Auto, reactor::Wakeup::EventFd] {
            // The schedule must find the reactor asleep; a slow machine (valgrind) may not
            // get there before it, so the delay doubles until it does.
            let mut delay = std::time::Duration::from_millis(20);
            let st = loop {
                let r = reactor::Reactor::builder()
                    .backend(r.backend())
                    .wakeup(wakeup)
                    .build()
                    .unwrap();
                woken_from_another_thread(&r, delay);
                let st = r.stats();
                if st.blocking_waits > 0 {
                    if r.backend() == reactor::Backend::Uring && wakeup == reactor::Wakeup::Auto {
                        assert_eq!(r.wakeup(), wakeup, "this kernel (6.13+) sends ring messages");
                    } else {
                        assert_eq!(r.wakeup(), reactor::Wakeup::EventFd);
                    }
                    break (r.wakeup(), st);
                }
                assert!(delay < std::time::Duration::from_secs(5), "the reactor never slept: {st:?}");
                delay *= 2;
            };
            match st.0 {
                reactor::Wakeup::Auto => {
                    assert!(st.1.ring_messages >= 1 && st.1.eventfd_writes == 0, "{:?}", st.1)
                }
                reactor::Wakeup::EventFd => {
                    assert!(st.1.eventfd_writes >= 1 && st.1.ring_messages == 0, "{:?}", st.1)
                }
            }
        }
    }

    fn bh_and_handle_after_the_reactor_is_gone(r: &Reactor) {
        let _ = r;
        let other = tests::reactor_on(r.backend());
        let h = other.handle();
        let bh = other.bh(|_| panic!("must not run"));
        let t = other.timer(|_| panic!("must not run"));
        drop(other);
        assert!(h.is_closed());
        assert_eq!(h.notify(), Err(reactor::Closed));
        assert_eq!(h.oneshot(|_| panic!("must not run")), Err(reactor::Closed));
        assert_eq!(h.oneshot_after(std::time::Duration::ZERO, |_| ()), Err(reactor::Closed));
        assert_eq!(h.stop(), Err(reactor::Closed));
        let e: std::io::Error = reactor::Closed.into();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
        bh.schedule();
        bh.cancel();
        t.arm_after(std::time::Duration::ZERO);
        drop((bh, t));
    }

    fn pending_work_is_dropped_unrun_with_the_reactor(r: &Reactor) {
        let _ = r;
        let other = tests::reactor_on(r.backend());
        let ran = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Count(Arc<AtomicUsize>);
        impl Drop for Count {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        for _ in 0..3 {
            let (c, ran) = (Count(dropped.clone()), ran.clone());
            other.handle().oneshot(move |_| {
                let _c = c;
                ran.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
        }
        let c = Count(dropped.clone());
        let bh = other.bh(move |_| {
            let _ = &c;
        });
        bh.schedule();
        drop(other);
        assert_eq!(ran.load(Ordering::Relaxed), 0);
        assert_eq!(dropped.load(Ordering::Relaxed), 4, "every callback dropped at reactor drop");
        drop(bh);
    }

    fn work_queued_by_the_home_thread_runs_in_order_or_is_dropped_with_the_reactor(r: &Reactor) {
        // Work scheduled from inside a callback stays on the home thread (no shared list): it
        // runs in the next iteration, in schedule order with work from other threads queued
        // before it was taken, and is dropped unrun if the reactor goes first.
        let order = Rc::new(RefCell::new(Vec::new()));
        let (o1, o2) = (order.clone(), order.clone());
        let late = Rc::new(r.bh(move |_| o1.borrow_mut().push("local")));
        let late2 = late.clone();
        let first = r.bh(move |r| {
            o2.borrow_mut().push("first");
            late2.schedule();
            // Another thread's one-shot, queued on the shared list meanwhile.
            let h = r.handle();
            let remote = std::thread::spawn(move || h.oneshot(|_| {}).unwrap());
            remote.join().unwrap();
            o2.borrow_mut().push("callback done");
        });
        first.schedule();
        let runs = r.stats().bh_runs;
        assert!(r.poll(false));
        assert_eq!(*order.borrow(), ["first", "callback done"], "not in the same iteration");
        assert!(late.is_scheduled());
        assert!(r.poll(false));
        assert_eq!(*order.borrow(), ["first", "callback done", "local"]);
        assert_eq!(r.stats().bh_runs - runs, 3, "the remote one-shot ran with it");
        assert!(!r.poll(false), "each ran once");

        let other = tests::reactor_on(r.backend());
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Count(Arc<AtomicUsize>);
        impl Drop for Count {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let d = dropped.clone();
        let starter = other.bh(move |r| {
            let c = Count(d.clone());
            r.handle().oneshot(move |_| drop(c)).unwrap();
            let c = Count(d.clone());
            r.spawn_local(async move { drop(c) });
        });
        starter.schedule();
        assert!(other.poll(false));
        assert_eq!(dropped.load(Ordering::Relaxed), 0, "queued, not run yet");
        drop(other);
        assert_eq!(dropped.load(Ordering::Relaxed), 2, "dropped unrun with the reactor");
        drop(starter);
    }
}

/// A BH scheduled from another thread `delay` from now, while `r` sleeps in `poll(true)`,
/// ends that poll.
fn woken_from_another_thread(r: &reactor::Reactor, delay: std::time::Duration) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let bh = Arc::new(r.bh(move |_| {
        n2.fetch_add(1, Ordering::Relaxed);
    }));
    let bh2 = bh.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(delay);
        bh2.schedule();
    });
    assert!(r.poll(true), "woken by the schedule");
    assert_eq!(n.load(Ordering::Relaxed), 1);
    t.join().unwrap();
}
