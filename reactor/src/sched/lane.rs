//! Lanes: jobs of a [`ThreadPool`] that run one at a time, in order, on whichever pool thread
//! the lane holds, so that work the kernel would serialise anyway does not occupy (and wake,
//! and put back to sleep) one pool thread per job.
//!
//! The reactor gives each buffered file one lane for its writes: a buffered write holds the
//! inode's lock for all its work on every common Linux file system, so 32 writes in flight on
//! 32 threads are 31 threads asleep on that lock and a context switch per write (measured on
//! the NBD server's QD32 writes: 14 µs of CPU per request on the open pool, 10 µs with writes
//! in order on one thread). io_uring runs a file's buffered writes the same way, one io-wq
//! worker per inode.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::pool::{Closure, Job, ThreadPool};

/// How many jobs a lane runs before it gives its thread back to the pool's queue, so that a
/// lane that never empties cannot keep other work waiting on a pool with few threads.
const TURN: usize = 64;

/// A queue of jobs that run one after another on a pool. Cloning shares the lane.
#[derive(Clone, Default)]
pub(crate) struct Lane {
    shared: Arc<LaneState>,
}

#[derive(Default)]
struct LaneState {
    state: Mutex<State>,
    /// [`Pending`] marks alive: work for the lane that has not finished.
    unfinished: AtomicUsize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// A pool job is draining the queue (or is queued on the pool to do so).
    running: bool,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Lane")
            .field("queued", &st.queue.len())
            .field("running", &st.running)
            .finish()
    }
}

impl Lane {
    pub(crate) fn new() -> Lane {
        Lane::default()
    }

    /// Whether no [`Pending`] mark of the lane is alive: all the work given to it has finished
    /// (and what it did, on any thread, happened before what the caller does next).
    pub(crate) fn idle(&self) -> bool {
        // Acquire: pairs with the Release decrement in `Pending::drop`, so the last job's
        // work (its system call) is ordered before the caller's next step.
        self.shared.unfinished.load(Ordering::Acquire) == 0
    }

    /// Marks work for the lane as pending until the mark is dropped. The job given to
    /// [`execute`](Self::execute) carries it and drops it as soon as its work is done (before
    /// it wakes anyone with the result), or when it unwinds; a job dropped unrun drops it with
    /// its closure (for `spawn_blocking_in`, once the awaiting future is gone too).
    pub(crate) fn pending(&self) -> Pending {
        // Relaxed: only the caller's own later `idle` must see it, in program order; other
        // threads learn of it through the job's hand-over.
        self.shared.unfinished.fetch_add(1, Ordering::Relaxed);
        Pending(self.shared.clone())
    }

    /// Runs `job` on `pool` after every job given to this lane before it, and never at the
    /// same time as another of them. A job that panics is caught; the lane goes on.
    pub(crate) fn execute(&self, pool: &ThreadPool, job: Job) {
        let start = {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.queue.push_back(job);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            self.schedule(pool.clone());
        }
    }

    /// Puts a drainer of this lane on the pool.
    fn schedule(&self, pool: ThreadPool) {
        let lane = self.clone();
        pool.clone()
            .execute_job(Closure::job(move || lane.drain(pool)));
    }

    /// Runs the lane's jobs until it is empty or has had its turn.
    fn drain(self, pool: ThreadPool) {
        for _ in 0..TURN {
            let job = {
                let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
                match st.queue.pop_front() {
                    Some(job) => job,
                    None => {
                        st.running = false;
                        return;
                    }
                }
            };
            let _ = catch_unwind(AssertUnwindSafe(|| job.run()));
        }
        // Turn over with jobs left (`running` stays set): to the back of the pool's queue.
        self.schedule(pool);
    }
}

/// Work for a lane that has not finished: the lane is not [idle](Lane::idle) while it lives.
pub(crate) struct Pending(Arc<LaneState>);

impl Drop for Pending {
    fn drop(&mut self) {
        // Release: pairs with the Acquire load in `Lane::idle`.
        self.0.unfinished.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn jobs_run_in_order_one_at_a_time() {
        let pool = ThreadPool::new(0, 8, Duration::from_secs(1));
        let lane = Lane::new();
        let active = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for i in 0..500 {
            let (active, tx) = (active.clone(), tx.clone());
            lane.execute(
                &pool,
                Closure::job(move || {
                    assert_eq!(active.fetch_add(1, Ordering::SeqCst), 0, "two jobs at once");
                    if i % 50 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                    tx.send(i).unwrap();
                }),
            );
        }
        let got: Vec<i32> = (0..500).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(got, (0..500).collect::<Vec<_>>());
    }

    #[test]
    fn idle_only_while_no_pending_mark_lives() {
        let pool = ThreadPool::new(0, 2, Duration::from_secs(1));
        let lane = Lane::new();
        assert!(lane.idle());
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let (first, second) = (lane.pending(), lane.pending());
        lane.execute(
            &pool,
            Closure::job(move || {
                go_rx.recv().unwrap();
                drop(first);
            }),
        );
        lane.execute(
            &pool,
            Closure::job(move || {
                drop(second);
                done_tx.send(()).unwrap();
            }),
        );
        assert!(!lane.idle(), "two jobs given, none finished");
        go_tx.send(()).unwrap();
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            lane.idle(),
            "each job dropped its mark before it told anyone"
        );
        // A job that panics, or is dropped unrun, drops its mark too.
        let mark = lane.pending();
        lane.execute(
            &pool,
            Closure::job(move || {
                let _mark = mark;
                panic!("job fails on purpose")
            }),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !lane.idle() {
            assert!(
                std::time::Instant::now() < deadline,
                "a panicked job kept the lane busy"
            );
            std::thread::yield_now();
        }
        drop(Closure::job({
            let mark = lane.pending();
            move || drop(mark)
        }));
        assert!(lane.idle());
    }

    #[test]
    fn a_panicking_job_does_not_stop_the_lane() {
        let pool = ThreadPool::new(0, 2, Duration::from_secs(1));
        let lane = Lane::new();
        let (tx, rx) = mpsc::channel();
        lane.execute(&pool, Closure::job(|| panic!("job fails on purpose")));
        lane.execute(&pool, Closure::job(move || tx.send(7).unwrap()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(7));
    }

    #[test]
    fn a_busy_lane_leaves_room_for_other_work_on_a_one_thread_pool() {
        // The lane refills itself faster than it drains; another job on the pool still runs
        // once the lane has had its turn.
        let pool = ThreadPool::new(0, 1, Duration::from_secs(1));
        let lane = Lane::new();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        fn refill(lane: Lane, pool: ThreadPool, stop: Arc<std::sync::atomic::AtomicBool>) {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let (l2, p2) = (lane.clone(), pool.clone());
            lane.execute(&pool, Closure::job(move || refill(l2, p2, stop)));
        }
        refill(lane.clone(), pool.clone(), stop.clone());
        pool.execute(move || tx.send(()).unwrap());
        let other = rx.recv_timeout(Duration::from_secs(10));
        stop.store(true, Ordering::SeqCst);
        assert_eq!(other, Ok(()), "the other job never ran");
    }
}
