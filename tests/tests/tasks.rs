//! Tasks: spawning, joining, aborting, panics, cross-thread spawn and wake, budget, FIFO.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use reactor::JoinError;
use tests::{Signal, backend_tests, flush, yield_now};

struct OnDrop<F: FnMut()>(F);
impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

backend_tests! {
    fn spawn_local_and_join(r: &Reactor) {
        let rc = Rc::new(Cell::new(1)); // not Send
        let rc2 = rc.clone();
        let jh = r.spawn_local(async move {
            yield_now().await;
            rc2.set(rc2.get() + 1);
            rc2.get() * 10
        });
        assert!(!jh.is_finished());
        assert_eq!(r.block_on(jh).unwrap(), 20);
        flush(r); // block_on's own wakeup BH is freed at the next iteration
        assert_eq!(r.bh_count(), 0, "the finished task was freed");
    }

    fn tasks_woken_together_run_in_fifo_order(r: &Reactor) {
        let order = Rc::new(RefCell::new(Vec::new()));
        let signals: Vec<Signal> = (0..5).map(|_| Signal::new()).collect();
        for (i, s) in signals.iter().enumerate() {
            let (o, w) = (order.clone(), s.wait());
            r.spawn_local(async move {
                w.await;
                o.borrow_mut().push(i);
            })
            .detach();
        }
        flush(r); // every task is now waiting
        for i in [2, 0, 4, 1, 3] {
            signals[i].set();
        }
        assert!(r.poll(false));
        assert_eq!(*order.borrow(), vec![2, 0, 4, 1, 3]);
    }

    fn a_task_woken_many_times_is_polled_once(r: &Reactor) {
        let polls = Rc::new(Cell::new(0));
        let p2 = polls.clone();
        let s = Signal::new();
        let w = s.wait();
        let jh = r.spawn_local(async move {
            let mut w = std::pin::pin!(w);
            std::future::poll_fn(|cx| {
                p2.set(p2.get() + 1);
                w.as_mut().poll(cx)
            })
            .await
        });
        flush(r);
        assert_eq!(polls.get(), 1);
        for _ in 0..10 {
            s.set();
        }
        assert!(r.poll(false));
        assert_eq!(polls.get(), 2, "ten wakes, one poll");
        assert!(jh.is_finished());
    }

    fn abort_drops_the_future_and_reports_cancelled(r: &Reactor) {
        let dropped = Rc::new(Cell::new(false));
        let d2 = dropped.clone();
        let never = Signal::new();
        let w = never.wait();
        let jh = r.spawn_local(async move {
            let _g = OnDrop(move || d2.set(true));
            w.await;
            1
        });
        flush(r);
        assert!(!dropped.get());
        jh.abort();
        assert!(r.poll(false) || dropped.get());
        assert!(dropped.get());
        assert!(r.block_on(jh).unwrap_err().is_cancelled());
        flush(r);
        assert_eq!(r.bh_count(), 0);
    }

    fn abort_from_another_thread(r: &Reactor) {
        let never = Signal::new();
        let w = never.wait();
        let jh = r.spawn_local(w);
        flush(r);
        let jh = Arc::new(jh);
        let j2 = jh.clone();
        std::thread::spawn(move || j2.abort()).join().unwrap();
        r.run_until(|| jh.is_finished());
        let jh = Arc::try_unwrap(jh).unwrap();
        assert!(r.block_on(jh).unwrap_err().is_cancelled());
    }

    fn a_panicking_task_is_reported_and_the_reactor_goes_on(r: &Reactor) {
        let jh = r.spawn_local(async {
            yield_now().await;
            panic!("task failure");
        });
        let ok = r.spawn_local(async { 5 });
        let err = r.block_on(jh).unwrap_err();
        assert!(err.is_panic());
        assert!(err.to_string().contains("task failure"), "{err}");
        assert_eq!(r.block_on(ok).unwrap(), 5);
        let again = r.spawn_local(async { 6 });
        assert_eq!(r.block_on(again).unwrap(), 6);
    }

    fn spawn_from_another_thread_and_wake_from_another_thread(r: &Reactor) {
        let s = Signal::new();
        let (h, s2) = (r.handle(), s.clone());
        let jh = std::thread::spawn(move || {
            let w = s2.wait();
            h.spawn(async move {
                w.await;
                std::thread::current().name().map(str::to_owned)
            })
            .unwrap()
        })
        .join()
        .unwrap();
        flush(r);
        assert!(!jh.is_finished());
        let s3 = s.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            s3.set();
        });
        let out = r.block_on(jh).unwrap();
        waker.join().unwrap();
        assert_eq!(out, std::thread::current().name().map(str::to_owned), "ran on the reactor's thread");
    }

    fn waking_a_task_of_a_busy_reactor_costs_no_eventfd_write(r: &Reactor) {
        const N: u64 = 2000;
        let done = Arc::new(AtomicU64::new(0));
        let signals: Vec<Signal> = (0..N).map(|_| Signal::new()).collect();
        for s in &signals {
            let (w, d) = (s.wait(), done.clone());
            r.spawn_local(async move {
                w.await;
                d.fetch_add(1, Ordering::Relaxed);
            })
            .detach();
        }
        flush(r);
        let before = r.stats();
        let t = std::thread::spawn(move || {
            for s in signals {
                s.set();
            }
        });
        while done.load(Ordering::Relaxed) < N {
            r.poll(false); // busy: never announces that it may sleep
        }
        t.join().unwrap();
        let after = r.stats();
        assert_eq!(after.wakeups(), before.wakeups(), "{after:?}");
        assert!(after.task_polls >= before.task_polls + N);
    }

    fn a_task_storm_leaves_room_for_timers(r: &Reactor) {
        let r2 = reactor::Builder::new().backend(r.backend()).task_budget(10).build().unwrap();
        let stop = Rc::new(Cell::new(false));
        for _ in 0..100 {
            let st = stop.clone();
            r2.spawn_local(async move {
                while !st.get() {
                    yield_now().await;
                }
            })
            .detach();
        }
        let fired = Rc::new(Cell::new(false));
        let f2 = fired.clone();
        let st2 = stop.clone();
        let t = r2.timer(move |_| {
            f2.set(true);
            st2.set(true);
        });
        t.arm_after(std::time::Duration::from_millis(5));
        let mut max_polls = 0;
        while !fired.get() {
            let before = r2.stats().task_polls;
            r2.poll(true);
            max_polls = max_polls.max(r2.stats().task_polls - before);
        }
        assert!(max_polls <= 10, "budget exceeded: {max_polls} task polls in one iteration");
        flush(&r2);
        assert_eq!(r2.bh_count(), 1, "all tasks finished; the timer remains");
    }

    fn dropping_the_join_handle_detaches(r: &Reactor) {
        let ran = Rc::new(Cell::new(false));
        let r2 = ran.clone();
        drop(r.spawn_local(async move {
            yield_now().await;
            r2.set(true);
        }));
        flush(r);
        assert!(ran.get());
    }

    fn dropping_the_reactor_cancels_pending_tasks(r: &Reactor) {
        let other = tests::reactor_on(r.backend());
        let dropped = Rc::new(Cell::new(false));
        let d2 = dropped.clone();
        let never = Signal::new();
        let w = never.wait();
        let jh = other.spawn_local(async move {
            let _g = OnDrop(move || d2.set(true));
            w.await;
        });
        flush(&other);
        drop(other);
        assert!(dropped.get(), "the future was dropped with its reactor");
        assert!(jh.is_finished());
        let err = r.block_on(jh).unwrap_err();
        assert!(matches!(err, JoinError::Cancelled));
        never.set(); // waking a task of a dropped reactor is harmless
    }

    fn tasks_spawn_tasks_and_use_the_current_reactor(r: &Reactor) {
        let jh = r.spawn_local(async {
            let inner = reactor::Reactor::with_current(|r| r.spawn_local(async { 3 })).unwrap();
            inner.await.unwrap() + 1
        });
        assert_eq!(r.block_on(jh).unwrap(), 4);
    }
}
