//! How the runtime's operations spend the I/O budget of the task poll under way on the current
//! reactor (the budget and its rules: `sched/coop.rs`).

use std::future::poll_fn;
use std::task::{Context, Poll};

use crate::event_loop::Reactor;
use crate::sched::coop::BYTES_PER_UNIT;

/// Before an I/O operation that may complete without waiting: `Ready` while the current task
/// poll has budget left (or outside one), else `Pending` with the task woken, so that it
/// resumes in the next iteration with a full budget. Takes nothing: see [`spend`].
pub(crate) fn poll_proceed(cx: &mut Context<'_>) -> Poll<()> {
    let spent = Reactor::with_current(|r| {
        let spent = !r.io_budget().may_proceed();
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

/// An I/O operation that moved `bytes` (0 where that is not known) completed, returning its
/// result, in the current poll: one unit of its budget, and one more per [`BYTES_PER_UNIT`].
pub(crate) fn spend(bytes: usize) {
    Reactor::with_current(|r| r.io_budget().spend(bytes));
}

/// What an operation whose one unit was spent without its size (by `Async::read_with` or
/// `write_with`) adds once its size is known: one unit per [`BYTES_PER_UNIT`] it moved.
pub(crate) fn spend_bytes(bytes: usize) {
    if bytes >= BYTES_PER_UNIT {
        spend(bytes - BYTES_PER_UNIT);
    }
}
