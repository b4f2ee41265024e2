//! A task's budget of I/O operations that complete without waiting.
//!
//! A file read the page cache serves (`RWF_NOWAIT`), a small buffered write made inline, a
//! socket read that finds data already there: each completes inside the task's poll, and the
//! task never returns to the loop. A task doing such operations in a loop (copying a cached
//! file, draining a socket a peer keeps full) would keep the reactor's thread until it
//! stopped, and fd handlers, timers and every other task would wait. So each poll of a task,
//! or of `block_on`'s future, may complete a budget of I/O operations
//! ([`Builder::io_budget`](crate::Builder::io_budget), default [`DEFAULT_IO_BUDGET`]). Once it
//! is spent, the next operation yields before it starts, as [`yield_now`](crate::yield_now)
//! does: the task is queued behind the others and resumes in the next iteration, after the fd
//! monitor and the timers have had their turn, with a full budget
//! ([`Stats::io_budget_yields`](crate::Stats::io_budget_yields) counts these).
//!
//! Only operations that complete in the poll spend the budget. One that waits (it goes to the
//! ring or the thread pool, or finds its socket not ready) returns to the loop anyway and
//! spends nothing, so a task may wait on any number of sources at once. An operation spends one
//! unit, plus one per full [`BYTES_PER_UNIT`] (64 KiB) it moved: a copy of 1 MiB from the page
//! cache, which takes longer than a hundred small reads, spends 17. With the default budget a
//! task's poll so copies about 4 MiB, plus what its last operation moves (a single operation
//! is never cut short), before it yields. `Async::read_with` and `write_with` run a closure
//! whose result is not a length: they spend one unit whatever it moved.
//!
//! Outside a task's or `block_on`'s poll (an fd handler, a BH, a future polled by another
//! executor) there is no budget and nothing yields. Inside one, a future polled by another
//! executor nested in the task (a `futures::executor::block_on` within a task, which would
//! block the reactor anyway) may find the budget spent and be woken at once, again and again:
//! don't nest executors on a reactor's thread.
//!
//! This file is the budget itself, which the loop owns; `rt/budget.rs` is how the runtime's
//! operations spend the current reactor's.

use std::cell::Cell;

/// Default number of I/O operations one task poll may complete without waiting (see
/// [`Builder::io_budget`](crate::Builder::io_budget)).
///
/// ```
/// let r = reactor::Reactor::builder().io_budget(reactor::DEFAULT_IO_BUDGET).build()?;
/// assert_eq!(r.stats().io_budget_yields, 0);
/// # Ok::<(), std::io::Error>(())
/// ```
pub const DEFAULT_IO_BUDGET: u32 = 64;

/// An operation that moved this many bytes spends one unit of the budget more (see the module
/// docs).
pub(crate) const BYTES_PER_UNIT: usize = 64 * 1024;

/// A reactor's budget: what is left of it in the task poll that is running, if any.
pub(crate) struct Budget {
    full: u32,
    /// `None` outside a task's (or `block_on`'s) poll.
    left: Cell<Option<u32>>,
}

/// The budget of one task poll: restores the enclosing poll's (a nested `poll` inside a task
/// runs other tasks) when dropped.
pub(crate) struct TaskPoll<'a> {
    budget: &'a Budget,
    outer: Option<u32>,
}

impl Drop for TaskPoll<'_> {
    fn drop(&mut self) {
        self.budget.left.set(self.outer);
    }
}

impl Budget {
    pub(crate) fn new(full: u32) -> Self {
        Budget {
            full: full.max(1),
            left: Cell::new(None),
        }
    }

    /// A task poll (or a poll of `block_on`'s future) starts, with the whole budget, until the
    /// guard is dropped.
    pub(crate) fn task_poll(&self) -> TaskPoll<'_> {
        let outer = self.left.replace(Some(self.full));
        TaskPoll {
            budget: self,
            outer,
        }
    }

    /// Whether an operation may start without yielding first.
    pub(crate) fn may_proceed(&self) -> bool {
        self.left.get() != Some(0)
    }

    /// An operation that moved `bytes` completed in this poll.
    pub(crate) fn spend(&self, bytes: usize) {
        if let Some(left) = self.left.get() {
            let units = u32::try_from(1 + bytes / BYTES_PER_UNIT).unwrap_or(u32::MAX);
            self.left.set(Some(left.saturating_sub(units)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_poll_has_the_whole_budget_and_gives_the_outer_one_back() {
        let b = Budget::new(2);
        // Outside a task poll: no budget, nothing yields.
        b.spend(0);
        assert!(b.may_proceed());
        {
            let _outer = b.task_poll();
            b.spend(0);
            assert!(b.may_proceed());
            {
                // A nested poll runs another task, with a budget of its own.
                let _inner = b.task_poll();
                b.spend(0);
                b.spend(0);
                assert!(!b.may_proceed());
                b.spend(0);
                assert!(!b.may_proceed(), "a spent budget stays spent");
            }
            // Back in the outer task: one unit left.
            assert!(b.may_proceed());
            b.spend(0);
            assert!(!b.may_proceed());
        }
        assert!(b.may_proceed());
        // Bytes count too: one unit, plus one per 64 KiB moved.
        let bytes = Budget::new(10);
        {
            let _poll = bytes.task_poll();
            bytes.spend(BYTES_PER_UNIT - 1);
            bytes.spend(4 * BYTES_PER_UNIT);
            assert_eq!(bytes.left.get(), Some(4));
            bytes.spend(usize::MAX);
            assert!(!bytes.may_proceed());
        }
        // At least one unit, whatever was asked for.
        let one = Budget::new(0);
        let _poll = one.task_poll();
        assert!(one.may_proceed());
        one.spend(0);
        assert!(!one.may_proceed());
    }
}
