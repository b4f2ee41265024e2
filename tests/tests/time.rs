//! sleep, timeout, interval.

use std::time::{Duration, Instant};

use reactor::time;
use tests::{backend_tests, flush};

backend_tests! {
    fn sleep_is_not_early(r: &Reactor) {
        for ms in [0u64, 1, 5] {
            let t0 = Instant::now();
            r.block_on(time::sleep(Duration::from_millis(ms)));
            assert!(t0.elapsed() >= Duration::from_millis(ms));
        }
        let t0 = Instant::now();
        r.block_on(time::sleep_until(t0 + Duration::from_millis(3)));
        assert!(t0.elapsed() >= Duration::from_millis(3));
    }

    fn timeout_elapses_or_not(r: &Reactor) {
        let out = r.block_on(time::timeout(Duration::from_millis(50), async { 7 }));
        assert_eq!(out, Ok(7));
        let t0 = Instant::now();
        let out = r.block_on(time::timeout(Duration::from_millis(5), time::sleep(Duration::from_secs(3600))));
        assert_eq!(out, Err(time::Elapsed));
        assert!(t0.elapsed() >= Duration::from_millis(5));
        assert!(t0.elapsed() < Duration::from_secs(60));
        let e: std::io::Error = time::Elapsed.into();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    fn an_interval_too_long_for_an_instant_does_not_panic(r: &Reactor) {
        r.block_on(async {
            let mut iv = time::interval(Duration::MAX);
            let first = iv.tick().await;
            assert!(first <= std::time::Instant::now());
            // The next tick is a century away: it must not be due now.
            let next = time::timeout(Duration::from_millis(20), iv.tick()).await;
            assert!(next.is_err());
        });
    }

    fn interval_ticks_once_per_period(r: &Reactor) {
        let ticks = r.block_on(async {
            let mut iv = time::interval(Duration::from_millis(4));
            let mut ticks = Vec::new();
            for _ in 0..5 {
                ticks.push(iv.tick().await);
            }
            ticks
        });
                for w in ticks.windows(2) {
            // Scheduled instants are exact multiples of the period (a slow machine may skip
            // ticks, never shift them).
            let d = (w[1] - w[0]).as_nanos();
            assert!(d > 0 && d % 4_000_000 == 0, "tick spacing {d} ns");
        }
    }

    fn interval_skips_missed_ticks(r: &Reactor) {
        let (first, second) = r.block_on(async {
            let mut iv = time::interval(Duration::from_millis(2));
            let first = iv.tick().await;
            std::thread::sleep(Duration::from_millis(11)); // miss several ticks
            iv.tick().await;
            (first, iv.tick().await)
        });
        assert!(second - first >= Duration::from_millis(12), "no burst of missed ticks");
    }

    fn dropping_a_pending_sleep_cancels_its_timer(r: &Reactor) {
        let jh = r.spawn_local(time::sleep(Duration::from_secs(3600)));
        flush(r);
        assert_eq!(r.bh_count(), 2, "the task and its timer");
        jh.abort();
        flush(r);
        assert_eq!(r.bh_count(), 0, "timer and task freed");
        assert!(!r.poll(false));
    }

    fn sleep_in_a_send_task_spawned_from_another_thread(r: &Reactor) {
        let h = r.handle();
        let jh = std::thread::spawn(move || {
            h.spawn(async {
                let t0 = Instant::now();
                time::sleep(Duration::from_millis(3)).await;
                t0.elapsed()
            })
            .unwrap()
        })
        .join()
        .unwrap();
        assert!(r.block_on(jh).unwrap() >= Duration::from_millis(3));
    }

    fn sleep_outside_a_reactor_panics_clearly(r: &Reactor) {
        let _ = r;
        let mut s = std::pin::pin!(time::sleep(Duration::from_secs(1)));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = s.as_mut().poll(&mut cx);
        }))
        .unwrap_err();
        let msg = err.downcast_ref::<&str>().copied().unwrap_or_default();
        assert!(msg.contains("reactor"), "{msg}");
    }

    fn many_concurrent_sleeps(r: &Reactor) {
        let n = 2000;
        let jhs: Vec<_> = (0..n)
            .map(|i| r.spawn_local(time::sleep(Duration::from_micros(100 * (i % 50)))))
            .collect();
        r.block_on(async {
            for jh in jhs {
                jh.await.unwrap();
            }
        });
        flush(r);
        assert_eq!(r.bh_count(), 0);
    }
}
