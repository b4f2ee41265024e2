//! Many threads scheduling into one reactor: nothing lost, nothing run twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tests::backend_tests;

const THREADS: usize = 4;
const BATCH: usize = 1000;

/// Total schedules, from `REACTOR_STRESS_SCHEDULES` (default 10^6).
fn total() -> usize {
    std::env::var("REACTOR_STRESS_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

struct PerThread {
    /// Sequence number of the latest task wake (written before waking).
    task_want: AtomicU64,
    /// Latest sequence number the task saw.
    task_seen: AtomicU64,
    task_waker: std::sync::Mutex<Option<std::task::Waker>>,
    task_wakes: AtomicU64,
    task_polls: AtomicU64,
    /// Sequence number of the latest BH schedule (written before scheduling).
    want: AtomicU64,
    /// Latest sequence number a BH run saw.
    seen: AtomicU64,
    bh_runs: AtomicU64,
    bh_schedules: AtomicU64,
    oneshots_run: AtomicU64,
}

fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(
            t0.elapsed() < deadline,
            "lost wakeup: {what} not done after {deadline:?}"
        );
        std::thread::yield_now();
    }
}

backend_tests! {
    fn four_threads_schedule_bhs_oneshots_and_task_wakes(r: &Reactor) {
        // On io_uring: woken by ring messages where the kernel has them.
        stress(r);
    }
}

/// The same through the eventfd on io_uring (the fallback where ring messages cannot be
/// sent); epoll uses it always.
#[cfg(feature = "uring")]
#[test]
fn four_threads_on_io_uring_woken_through_the_eventfd() {
    let r = reactor::Reactor::builder()
        .backend(reactor::Backend::Uring)
        .wakeup(reactor::Wakeup::EventFd)
        .build()
        .expect("the io_uring backend cannot be created on this machine");
    assert_eq!(r.wakeup(), reactor::Wakeup::EventFd);
    stress(&r);
    assert_eq!(r.stats().ring_messages, 0);
}

fn stress(r: &reactor::Reactor) {
    {
        let per = total() / THREADS / BATCH * BATCH;
        let runs: Arc<Vec<AtomicU8>> =
            Arc::new((0..per * THREADS).map(|_| AtomicU8::new(0)).collect());
        let stats: Vec<Arc<PerThread>> = (0..THREADS)
            .map(|_| {
                Arc::new(PerThread {
                    task_want: AtomicU64::new(0),
                    task_seen: AtomicU64::new(0),
                    task_waker: std::sync::Mutex::new(None),
                    task_wakes: AtomicU64::new(0),
                    task_polls: AtomicU64::new(0),
                    want: AtomicU64::new(0),
                    seen: AtomicU64::new(0),
                    bh_runs: AtomicU64::new(0),
                    bh_schedules: AtomicU64::new(0),
                    oneshots_run: AtomicU64::new(0),
                })
            })
            .collect();
        let bhs: Vec<Arc<reactor::Bh>> = stats
            .iter()
            .map(|s| {
                let s = s.clone();
                Arc::new(r.bh(move |_| {
                    // Acquire: pairs with the release store before the schedule.
                    let w = s.want.load(Ordering::Acquire);
                    assert!(w >= s.seen.load(Ordering::Relaxed), "went back in time");
                    s.seen.store(w, Ordering::Release);
                    s.bh_runs.fetch_add(1, Ordering::Relaxed);
                }))
            })
            .collect();
        // One task per thread, woken by that thread: it records the latest sequence number it
        // was woken for, and finishes when it has seen the thread's last one.
        let last_task_op = (0..per as u64).rev().find(|k| k % 3 == 2).unwrap_or(0);
        let tasks: Vec<_> = stats
            .iter()
            .map(|s| {
                let s = s.clone();
                r.spawn_local(async move {
                    loop {
                        let seen = std::future::poll_fn(|cx| {
                            s.task_polls.fetch_add(1, Ordering::Relaxed);
                            *s.task_waker.lock().unwrap() = Some(cx.waker().clone());
                            // Acquire: pairs with the release store before the wake.
                            let w = s.task_want.load(Ordering::Acquire);
                            if w > s.task_seen.load(Ordering::Relaxed) {
                                std::task::Poll::Ready(w)
                            } else {
                                std::task::Poll::Pending
                            }
                        })
                        .await;
                        s.task_seen.store(seen, Ordering::Release);
                        if seen == last_task_op {
                            return;
                        }
                    }
                })
            })
            .collect();
        let finished = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (h, s, bh, runs, finished, failed) = (
                    r.handle(),
                    stats[t].clone(),
                    bhs[t].clone(),
                    runs.clone(),
                    finished.clone(),
                    failed.clone(),
                );
                std::thread::spawn(move || {
                    let mut guard = FailGuard {
                        failed,
                        h: h.clone(),
                        armed: true,
                    };
                    let mut oneshots = 0u64;
                    for b in 0..per / BATCH {
                        for i in 0..BATCH {
                            let k = b * BATCH + i;
                            if k % 3 == 2 {
                                // Release: pairs with the task's acquire load.
                                s.task_want.store(k as u64, Ordering::Release);
                                s.task_wakes.fetch_add(1, Ordering::Relaxed);
                                let w = s.task_waker.lock().unwrap().clone();
                                if let Some(w) = w {
                                    w.wake();
                                }
                            } else if k % 3 == 0 {
                                let (runs, s) = (runs.clone(), s.clone());
                                let slot = t * per + k;
                                h.oneshot(move |_| {
                                    let before = runs[slot].fetch_add(1, Ordering::Relaxed);
                                    assert_eq!(before, 0, "one-shot {slot} ran twice");
                                    s.oneshots_run.fetch_add(1, Ordering::Relaxed);
                                })
                                .unwrap();
                                oneshots += 1;
                            } else {
                                // Release: pairs with the acquire load in the BH.
                                s.want.store(k as u64, Ordering::Release);
                                s.bh_schedules.fetch_add(1, Ordering::Relaxed);
                                bh.schedule();
                            }
                        }
                        // Wait until the reactor has consumed the batch; it then goes to sleep,
                        // and the next batch must wake it.
                        let in_batch = |m: usize| {
                            (b * BATCH..(b + 1) * BATCH)
                                .rev()
                                .find(|k| k % 3 == m)
                                .unwrap() as u64
                        };
                        let (last_bh, last_task) = (in_batch(1), in_batch(2));
                        wait_for("batch", Duration::from_secs(20), || {
                            s.oneshots_run.load(Ordering::Relaxed) == oneshots
                                && s.seen.load(Ordering::Acquire) == last_bh
                                && s.task_seen.load(Ordering::Acquire) == last_task
                        });
                        if b % 16 == 0 {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                    guard.disarm();
                    finished.fetch_add(1, Ordering::Release);
                    h.notify().unwrap(); // the reactor re-checks `finished` after a wakeup
                })
            })
            .collect();
        r.run_until(|| {
            finished.load(Ordering::Acquire) == THREADS as u64 || failed.load(Ordering::Relaxed)
        });
        for t in threads {
            t.join().expect("a producer thread failed");
        }
        let lost: usize = (0..THREADS)
            .flat_map(|t| (0..per).step_by(3).map(move |k| t * per + k))
            .filter(|&slot| runs[slot].load(Ordering::Relaxed) != 1)
            .count();
        assert_eq!(lost, 0, "one-shots not run exactly once");
        for s in &stats {
            let (runs, scheds) = (
                s.bh_runs.load(Ordering::Relaxed),
                s.bh_schedules.load(Ordering::Relaxed),
            );
            assert!(
                runs >= 1 && runs <= scheds,
                "BH ran {runs} times for {scheds} schedules"
            );
            assert_eq!(
                s.seen.load(Ordering::Relaxed),
                s.want.load(Ordering::Relaxed)
            );
            let (polls, wakes) = (
                s.task_polls.load(Ordering::Relaxed),
                s.task_wakes.load(Ordering::Relaxed),
            );
            assert!(
                polls <= wakes + 1,
                "task polled {polls} times for {wakes} wakes"
            );
            assert_eq!(s.task_seen.load(Ordering::Relaxed), last_task_op);
        }
        for t in tasks {
            assert!(t.is_finished(), "every task saw its last wake");
        }
        let st = r.stats();
        eprintln!(
            "{:?}: {} schedules (BHs, one-shots, task wakes), {:?}",
            r.backend(),
            per * THREADS,
            st
        );
        assert!(st.blocking_waits > 0, "the reactor never blocked: {st:?}");
        assert!(st.wakeups() > 0, "no producer ever had to wake it: {st:?}");
    }
}

/// Sets `failed` and wakes the reactor if the thread unwinds, so the test fails instead of
/// hanging.
struct FailGuard {
    failed: Arc<AtomicBool>,
    h: reactor::Handle,
    armed: bool,
}

impl FailGuard {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for FailGuard {
    fn drop(&mut self) {
        if self.armed {
            self.failed.store(true, Ordering::Relaxed);
            let _ = self.h.notify();
        }
    }
}
