//! The server-wide memory budget: payload bytes of every connection's requests in flight
//! (write data being written, read data not yet sent) count against one limit, on top of each
//! connection's own cap. Admission waits when the budget is spent — it never fails — and a
//! release wakes whoever waits, on whatever IoThread.
//!
//! A request larger than the whole budget is admitted when nothing else holds any of it, so
//! every request can proceed eventually. Clients that hold their share without reading their
//! replies cannot keep the others waiting past the idle timeout, which disconnects them.

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

/// The default [`Config::max_memory`](crate::Config::max_memory): 512 MiB.
pub const DEFAULT_MAX_MEMORY: usize = 512 << 20;
/// The smallest budget accepted: two of the largest requests (2 × 32 MiB).
pub const MIN_MAX_MEMORY: usize = 64 << 20;

#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// Tasks waiting for room; all are woken by a release (they race for it again).
    waiters: Mutex<Vec<Waker>>,
    /// Whether `waiters` may be non-empty: the release path looks at the list only then.
    waiting: AtomicUsize,
}

/// Bytes held against the budget; given back when dropped.
#[derive(Debug)]
pub(crate) struct Grant {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
            waiters: Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
        })
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> usize {
        // Relaxed: a reading for statistics and tests.
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, bytes: usize) -> bool {
        // SeqCst: pairs with the SeqCst load of `waiting` in `release` (a Dekker pair: either
        // this sees the bytes a release gave back, or that release sees this task waiting).
        let mut cur = self.used.load(Ordering::SeqCst);
        loop {
            if cur > 0 && cur.saturating_add(bytes) > self.limit {
                return false;
            }
            // SeqCst: as above.
            match self.used.compare_exchange_weak(
                cur,
                cur + bytes,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Waits until `bytes` fit, and holds them.
    pub(crate) async fn acquire(self: &Arc<Self>, bytes: usize) -> Grant {
        poll_fn(|cx| {
            if self.try_take(bytes) {
                return Poll::Ready(());
            }
            {
                let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
                waiters.push(cx.waker().clone());
                // SeqCst: pairs with the SeqCst load in `release` (see `try_take`). Changed
                // under the lock only, so it always equals the list's length.
                self.waiting.fetch_add(1, Ordering::SeqCst);
            }
            // A release between the first try and the registration above is seen here.
            if self.try_take(bytes) {
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
        Grant {
            budget: self.clone(),
            bytes,
        }
    }

    fn release(&self, bytes: usize) {
        // SeqCst: pairs with `try_take` and the `waiting` increment in `acquire`.
        self.used.fetch_sub(bytes, Ordering::SeqCst);
        // SeqCst: pairs with the increment in `acquire`.
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let woken = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            // SeqCst: pairs with the increment in `acquire` (both under the lock).
            self.waiting.fetch_sub(waiters.len(), Ordering::SeqCst);
            std::mem::take(&mut *waiters)
        };
        for w in woken {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reactor::Reactor;

    #[test]
    fn admission_waits_for_room_and_never_fails() {
        let r = Reactor::new().unwrap();
        let b = Budget::new(100);
        r.block_on(async {
            let g1 = b.acquire(60).await;
            let g2 = b.acquire(40).await;
            assert_eq!(b.used(), 100);
            let b2 = b.clone();
            let waiter = Reactor::with_current(|r| {
                r.spawn_local(async move {
                    let g = b2.acquire(50).await;
                    g.bytes
                })
            })
            .unwrap();
            reactor::yield_now().await;
            assert_eq!(b.used(), 100, "the third waits");
            drop(g1);
            assert_eq!(waiter.await.unwrap(), 50);
            drop(g2);
            assert_eq!(
                b.used(),
                0,
                "the waiter's grant went back when it was dropped"
            );
            // Larger than the whole budget: admitted when nothing else is held.
            let big = b.acquire(1000).await;
            assert_eq!(b.used(), 1000);
            drop(big);
        });
    }

    #[test]
    fn a_release_on_another_thread_wakes_the_waiter() {
        let r = Reactor::new().unwrap();
        let b = Budget::new(10);
        let g = r.block_on(b.acquire(10));
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(g);
        });
        let g2 = r.block_on(b.acquire(10));
        assert_eq!(b.used(), 10);
        drop(g2);
        t.join().unwrap();
        assert_eq!(b.used(), 0);
    }
}
