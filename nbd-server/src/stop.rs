//! Graceful shutdown: a per-IoThread stop signal that connections wait on between requests,
//! and a count of live connections the server waits on.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::rc::Rc;
use std::sync::{Condvar, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// The stop signal of one IoThread's connections.
#[derive(Default)]
pub(crate) struct Stop {
    stopped: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

thread_local! {
    static STOP: Rc<Stop> = Rc::new(Stop::default());
}

impl Stop {
    /// This thread's signal.
    pub(crate) fn current() -> Rc<Stop> {
        STOP.with(Rc::clone)
    }

    /// Stops every connection of this thread at its next request boundary.
    pub(crate) fn trigger() {
        STOP.with(|s| {
            s.stopped.set(true);
            for w in s.waiters.borrow_mut().drain(..) {
                w.wake();
            }
        });
    }

    /// Runs `fut` unless the signal comes first: `None` then (and `fut` is dropped).
    pub(crate) async fn unless_stopped<F: Future>(&self, fut: F) -> Option<F::Output> {
        let mut fut = pin!(fut);
        poll_fn(|cx| {
            if self.stopped.get() {
                return Poll::Ready(None);
            }
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// Live connections, counted across threads.
#[derive(Default)]
pub(crate) struct Live {
    count: Mutex<usize>,
    zero: Condvar,
}

/// One live connection; dropping it (also when its task is dropped) uncounts it.
pub(crate) struct LiveGuard<'a>(&'a Live);

impl Live {
    pub(crate) fn enter(&self) -> LiveGuard<'_> {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        LiveGuard(self)
    }

    /// Waits until no connection is live or `limit` has passed; true if none is.
    pub(crate) fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = self
                .zero
                .wait_timeout(n, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        let mut n = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            self.0.zero.notify_all();
        }
    }
}
