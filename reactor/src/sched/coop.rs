//! A task's budget of I/O operations that complete without waiting.
//!
//! A file read the page cache serves (`RWF_NOWAIT`), a small buffered write made inline, a
//! socket read that finds data already there: each completes inside the task's poll, and the
//! task never returns to the loop. A task doing such operations in a loop (copying a cached
//! file, draining a socket a peer keeps full) would keep the reactor's thread until it
//! stopped, and fd handlers, timers and every other task would wait. So each task poll may
//! complete a budget of them ([`Builder::io_budget`](crate::Builder::io_budget), default
//! [`DEFAULT_IO_BUDGET`]); the next one first yields, as
//! [`yield_now`](crate::yield_now) does: the task is queued behind the others and resumes in
//! the next iteration, after the fd monitor and the timers have had their turn
//! ([`Stats::io_budget_yields`](crate::Stats::io_budget_yields) counts these). The budget is
//! refilled at every task poll and at every iteration (for futures polled outside a task,
//! such as `block_on`'s).
//!
//! An operation that waits (one that goes to the ring or the thread pool, or finds a socket
//! not ready) returns to the loop anyway and is not held back. Operations made outside any
//! reactor's poll are not counted.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Context, Poll};

use crate::reactor::Reactor;

/// Default number of I/O operations one task poll may complete without waiting (see
/// [`Builder::io_budget`](crate::Builder::io_budget)).
pub const DEFAULT_IO_BUDGET: u32 = 64;

/// A reactor's budget: what is left of it in the current task poll.
pub(crate) struct Budget {
    full: u32,
    left: Cell<u32>,
}

impl Budget {
    pub(crate) fn new(full: u32) -> Self {
        let full = full.max(1);
        Budget {
            full,
            left: Cell::new(full),
        }
    }

    /// A task poll or an iteration starts: the whole budget again.
    pub(crate) fn refill(&self) {
        self.left.set(self.full);
    }

    /// Takes one operation's worth; `false` when the budget is spent.
    fn take(&self) -> bool {
        let left = self.left.get();
        if left == 0 {
            return false;
        }
        self.left.set(left - 1);
        true
    }
}

/// Before an I/O operation that may complete without waiting: `Ready` with one unit of the
/// current reactor's budget taken, or, once the budget is spent, `Pending` with the task woken
/// (it resumes in the next iteration with a full budget).
pub(crate) fn poll_proceed(cx: &mut Context<'_>) -> Poll<()> {
    let spent = Reactor::with_current(|r| {
        let spent = !r.io_budget().take();
        if spent {
            r.count_io_budget_yield();
        }
        spent
    });
    if spent == Some(true) {
        cx.waker().wake_by_ref();
        Poll::Pending
    } else {
        Poll::Ready(())
    }
}

/// The async form of [`poll_proceed`].
pub(crate) async fn proceed() {
    poll_fn(poll_proceed).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_gives_its_units_then_refuses_until_refilled() {
        let b = Budget::new(3);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
        b.refill();
        assert!(b.take());
        // At least one unit, whatever was asked for.
        let one = Budget::new(0);
        assert!(one.take());
        assert!(!one.take());
    }
}
