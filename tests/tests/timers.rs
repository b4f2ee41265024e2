//! Timers: arming, re-arming, cancelling, the wait bound, cross-thread arming, saturation.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reactor::Timer;
use tests::{backend_tests, flush};

fn counting_timer(r: &reactor::Reactor) -> (Timer, Rc<Cell<u32>>) {
    let n = Rc::new(Cell::new(0));
    let n2 = n.clone();
    (r.timer(move |_| n2.set(n2.get() + 1)), n)
}

backend_tests! {
    fn timer_schedule(r: &Reactor) {
        let (t, n) = counting_timer(r);
        let t0 = Instant::now();
        t.arm_after(Duration::from_millis(10));
        assert!(t.is_armed());
        assert!(!r.poll(false), "not yet");
        assert_eq!(n.get(), 0);
        r.run_until(|| n.get() == 1);
        assert!(t0.elapsed() >= Duration::from_millis(10), "fired early: {:?}", t0.elapsed());
        assert!(!t.is_armed());
        assert!(!r.poll(false), "fires once per arming");
    }

    fn nearest_deadline_bounds_a_blocking_poll(r: &Reactor) {
        let (far, n_far) = counting_timer(r);
        let (near, n_near) = counting_timer(r);
        far.arm_after(Duration::from_secs(3600));
        let t0 = Instant::now();
        near.arm_after(Duration::from_millis(20));
        // One blocking poll: it must wake for the near timer and run it.
        let mut progressed = r.poll(true);
        while !progressed {
            // A spurious early return may happen; it must not be counted as progress.
            assert_eq!(n_near.get(), 0);
            progressed = r.poll(true);
        }
        assert_eq!((n_near.get(), n_far.get()), (1, 0));
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(20), "early: {took:?}");
        assert!(took < Duration::from_secs(60), "not bounded: {took:?}");
        assert!(far.is_armed());
    }

    fn rearm_moves_the_deadline(r: &Reactor) {
        let (t, n) = counting_timer(r);
        t.arm_after(Duration::from_secs(3600));
        t.arm_after(Duration::from_millis(5));
        r.run_until(|| n.get() == 1);
        t.arm_after(Duration::from_millis(1));
        t.arm_after(Duration::from_secs(3600));
        let (guard, g) = counting_timer(r);
        guard.arm_after(Duration::from_millis(30));
        r.run_until(|| g.get() == 1);
        assert_eq!(n.get(), 1, "the later arming replaced the earlier deadline");
        assert!(t.remaining().unwrap() > Duration::from_secs(3000));
    }

    fn cancel_disarms(r: &Reactor) {
        let (t, n) = counting_timer(r);
        t.arm_after(Duration::from_millis(1));
        t.cancel();
        assert!(!t.is_armed());
        assert_eq!(t.remaining(), None);
        let (guard, g) = counting_timer(r);
        guard.arm_after(Duration::from_millis(20));
        r.run_until(|| g.get() == 1);
        assert_eq!(n.get(), 0);
    }

    fn dropped_timer_never_fires_and_frees_its_callback(r: &Reactor) {
        let marker = Rc::new(());
        let m2 = marker.clone();
        let t = r.timer(move |_| panic!("dropped timer fired {m2:?}"));
        t.arm_after(Duration::ZERO);
        drop(t);
        flush(r);
        assert_eq!(Rc::strong_count(&marker), 1);
        assert_eq!(r.bh_count(), 0);
    }

    fn timers_fire_in_deadline_order(r: &Reactor) {
        let order = Rc::new(RefCell::new(Vec::new()));
        let timers: Vec<Timer> = [30u64, 10, 20, 0, 25]
            .iter()
            .map(|&ms| {
                let o = order.clone();
                let t = r.timer(move |_| o.borrow_mut().push(ms));
                t.arm_after(Duration::from_millis(ms));
                t
            })
            .collect();
        r.run_until(|| order.borrow().len() == 5);
        assert_eq!(*order.borrow(), vec![0, 10, 20, 25, 30]);
        drop(timers);
    }

    fn periodic_timer_rearms_itself(r: &Reactor) {
        let n = Rc::new(Cell::new(0));
        let me: Rc<RefCell<Option<Timer>>> = Rc::new(RefCell::new(None));
        let (n2, me2) = (n.clone(), me.clone());
        let t = r.timer(move |_| {
            n2.set(n2.get() + 1);
            if n2.get() < 5 {
                me2.borrow().as_ref().unwrap().arm_after(Duration::from_millis(1));
            }
        });
        t.arm_after(Duration::from_millis(1));
        *me.borrow_mut() = Some(t);
        r.run_until(|| n.get() == 5);
        assert!(!me.borrow().as_ref().unwrap().is_armed());
        me.borrow_mut().take();
    }

    fn a_timer_rearmed_for_now_does_not_starve_the_loop(r: &Reactor) {
        let n = Rc::new(Cell::new(0u32));
        let me: Rc<RefCell<Option<Timer>>> = Rc::new(RefCell::new(None));
        let (n2, me2) = (n.clone(), me.clone());
        let t = r.timer(move |_| {
            n2.set(n2.get() + 1);
            me2.borrow().as_ref().unwrap().arm_after(Duration::ZERO);
        });
        t.arm_after(Duration::ZERO);
        *me.borrow_mut() = Some(t);
        for i in 1..=3 {
            assert!(r.poll(false));
            assert_eq!(n.get(), i, "one firing per iteration");
        }
        me.borrow_mut().take();
    }

    fn duration_max_does_not_overflow(r: &Reactor) {
        let (t, n) = counting_timer(r);
        t.arm_after(Duration::MAX);
        assert!(t.is_armed());
        assert!(t.remaining().unwrap() > Duration::from_secs(100 * 365 * 24 * 3600));
        assert!(!r.poll(false));
        // A blocking poll with that timer as the nearest deadline: woken by another thread.
        let h = r.handle();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            h.notify().unwrap();
        });
        assert!(!r.poll(true));
        waker.join().unwrap();
        assert_eq!(n.get(), 0);
        // Deadlines in the far past fire at once.
        let (past, p) = counting_timer(r);
        past.arm_at(Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or_else(Instant::now));
        assert!(r.poll(false));
        assert_eq!(p.get(), 1);
    }

    fn arming_from_another_thread_wakes_the_reactor(r: &Reactor) {
        let fired = Arc::new(AtomicBool::new(false));
        let f2 = fired.clone();
        let t = r.timer(move |_| f2.store(true, Ordering::Relaxed));
        let t0 = Instant::now();
        let arming = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            t.arm_after(Duration::from_millis(10));
            t
        });
        // No timer is armed yet: this wait has no bound but the other thread's arming.
        r.run_until(|| fired.load(Ordering::Relaxed));
        assert!(t0.elapsed() >= Duration::from_millis(30));
        drop(arming.join().unwrap());
        flush(r);
    }

    fn cancel_from_another_thread(r: &Reactor) {
        let (t, n) = counting_timer(r);
        t.arm_after(Duration::from_millis(30));
        let t = std::thread::spawn(move || {
            t.cancel();
            t
        })
        .join()
        .unwrap();
        let (guard, g) = counting_timer(r);
        guard.arm_after(Duration::from_millis(60));
        r.run_until(|| g.get() == 1);
        assert_eq!(n.get(), 0);
        drop(t);
    }

    fn oneshot_timers_from_home_and_other_threads(r: &Reactor) {
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        r.oneshot_after(Duration::from_millis(5), move |_| {
            n2.fetch_add(1, Ordering::Relaxed);
        });
        let (h, n3) = (r.handle(), n.clone());
        std::thread::spawn(move || {
            let n4 = n3.clone();
            h.oneshot_after(Duration::from_millis(5), move |_| {
                n3.fetch_add(10, Ordering::Relaxed);
            })
            .unwrap();
            h.oneshot_at(Instant::now(), move |_| {
                n4.fetch_add(100, Ordering::Relaxed);
            })
            .unwrap();
        })
        .join()
        .unwrap();
        r.run_until(|| n.load(Ordering::Relaxed) == 111);
        flush(r);
        assert_eq!(n.load(Ordering::Relaxed), 111);
    }

    fn many_timers(r: &Reactor) {
        let n = Rc::new(Cell::new(0u32));
        let timers: Vec<Timer> = (0..10_000u64)
            .map(|i| {
                let n2 = n.clone();
                let t = r.timer(move |_| n2.set(n2.get() + 1));
                t.arm_after(Duration::from_micros(i % 1000));
                t
            })
            .collect();
        // Re-arm half of them many times: stale heap entries must not pile up or fire.
        for _ in 0..5 {
            for t in timers.iter().step_by(2) {
                t.arm_after(Duration::from_micros(500));
            }
        }
        r.run_until(|| n.get() == 10_000);
        flush(r);
        assert_eq!(n.get(), 10_000);
    }
}
