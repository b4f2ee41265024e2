//! Graceful shutdown: a per-IoThread stop signal that connections wait on between requests,
//! and a count of live connections the server waits on.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::rc::Rc;
use std::sync::{Condvar, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

/// The stop signal of one IoThread's connections.
#[derive(Default)]
pub(crate) struct Stop {
    stopped: Cell<bool>,
    /// The connections waiting now, each removed when its wait ends.
    waiters: RefCell<Slab<Waker>>,
}

thread_local! {
    static STOP: Rc<Stop> = Rc::new(Stop::default());
}

/// A waiter's place in [`Stop::waiters`], given back when the wait ends (or is dropped).
struct Slot<'a> {
    stop: &'a Stop,
    key: Cell<Option<usize>>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.stop.waiters.borrow_mut().remove(k);
        }
    }
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
            for (_, w) in s.waiters.borrow().iter() {
                w.wake_by_ref();
            }
        });
    }

    /// Runs `fut` unless the signal comes first: `None` then (and `fut` is dropped).
    pub(crate) async fn unless_stopped<F: Future>(&self, fut: F) -> Option<F::Output> {
        let slot = Slot {
            stop: self,
            key: Cell::new(None),
        };
        let mut fut = pin!(fut);
        poll_fn(|cx| {
            if self.stopped.get() {
                return Poll::Ready(None);
            }
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            let mut waiters = self.waiters.borrow_mut();
            match slot.key.get() {
                Some(k) if waiters[k].will_wake(cx.waker()) => {}
                Some(k) => waiters[k] = cx.waker().clone(),
                None => slot.key.set(Some(waiters.insert(cx.waker().clone()))),
            }
            Poll::Pending
        })
        .await
    }

    /// Connections waiting now (for tests).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiters.borrow().len()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Context;

    #[test]
    fn waits_leave_no_trace_and_the_signal_ends_them() {
        let stop = Stop::default();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        // A wait that ends by itself, and one that is dropped: both give their slot back.
        for _ in 0..1000 {
            let mut done = pin!(stop.unless_stopped(std::future::ready(7)));
            assert_eq!(done.as_mut().poll(&mut cx), Poll::Ready(Some(7)));
            let mut pending = pin!(stop.unless_stopped(std::future::pending::<()>()));
            assert_eq!(pending.as_mut().poll(&mut cx), Poll::Pending);
            assert_eq!(stop.waiting(), 1);
        }
        assert_eq!(stop.waiting(), 0, "no waker kept after its wait");
        let mut pending = pin!(stop.unless_stopped(std::future::pending::<()>()));
        assert_eq!(pending.as_mut().poll(&mut cx), Poll::Pending);
        stop.stopped.set(true);
        assert_eq!(pending.as_mut().poll(&mut cx), Poll::Ready(None));
    }
}
