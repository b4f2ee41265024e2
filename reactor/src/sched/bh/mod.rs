//! Bottom halves: [`Bh`], and the nodes, queues and rules behind BHs, timers, one-shots and
//! tasks.
//!
//! A BH is a callback that runs on the reactor's home thread after being scheduled from any
//! thread. The rules (those of QEMU's AioContext, which storage code relies on):
//!
//! - scheduling a scheduled BH is a no-op, and a BH runs at most once per schedule;
//! - a BH scheduled while BHs run (by itself or another) runs in the next iteration;
//! - one-shot BHs free themselves after running; a deleted BH never runs again;
//! - idle BHs do not count as progress and bound the wait to about 10 ms;
//! - a nested `poll` first drains what the outer `poll` already took, then its own;
//! - a [`Bh`] may be dropped on any thread, but its callback (which need not be `Send`) is only
//!   run and dropped on the home thread: dropping marks it deleted and the home thread frees it;
//! - no borrow is held while a callback runs: the callback is taken out, run, and put back.
//!
//! The files:
//!
//! - `node.rs`: a node of any kind ([`Kind`]: `Bh`, `Timer`, `OneShot`, `OneShotTimer`,
//!   `Task`), its home-only state, and the table of who owns its reference in each state;
//!   scheduling (`enqueue`) and posting a one-shot;
//! - `fifo.rs`: the home thread's queues (run queue, local queue) and what is pending;
//! - `home.rs`: the home thread's registry, the take (local queue, then the shared list, onto
//!   the run queue) and one dequeue function per kind; running a callback and freeing a node.
//!
//! Queues: other threads push on the shared lock-free list; the home thread, when it schedules
//! work for its own reactor while that reactor polls, appends to a local queue instead (no
//! atomic besides the node's flags). Each take appends both to the run queue. The flags, the
//! list and the synchronisation points SP1–SP8 live in `lockfree/protocol.rs`.
//!
//! Adding a kind: a [`Kind`] variant with its row in `Kind::queue_ref` (and its fixed flags),
//! a constructor, and its arm in `BhHome::dequeue`.
//!
//! `unsafe` here, each for one of three reasons:
//!
//! - `BhNode` is `Send + Sync` although its home state is not (`node.rs`, at the impls: only
//!   the home thread's parts of a reactor reach it);
//! - the queue's reference to a node is a raw pointer, converted only where the ownership
//!   table says (`node.rs`: `arc`, `post`, `push_ref`, `unpush_ref`, `unqueue`);
//! - links are raw pointers of intrusive queues, valid while their node is PENDING
//!   (`fifo.rs`: `next_of`, `set_next_of`, `walk`, `push` and `pop`; the module docs there
//!   say where its links come from).

mod fifo;
mod home;
mod node;

pub(crate) use fifo::Peek;
pub(crate) use home::{BhHome, run_once};
pub(crate) use node::{BhNode, Callback, Kind};

pub(crate) use crate::lockfree::protocol::{DELETED, IDLE, SCHEDULED};
use crate::lockfree::sync::Arc;

/// The wait bound while only idle BHs are scheduled.
pub(crate) const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(10);

/// A bottom half: a callback that runs on its reactor's thread when scheduled.
///
/// `Bh` is `Send + Sync`: schedule, cancel or drop it from any thread. The callback itself is
/// only ever run and dropped on the reactor's thread, so it need not be `Send`.
///
/// - [`schedule`](Self::schedule) makes it run once in the next iteration of the reactor (and
///   wakes the reactor if it sleeps); scheduling it again before it runs changes nothing.
/// - [`schedule_idle`](Self::schedule_idle) does the same without counting as progress and
///   without waking the reactor sooner than about 10 ms.
/// - [`cancel`](Self::cancel) undoes a schedule that has not run yet.
/// - Dropping the `Bh` deletes it: it will not run again, and its callback is dropped on the
///   reactor's thread. After the reactor is dropped, all of these do nothing.
///
/// A BH never runs re-entrantly: if it becomes due again while its callback is running (and
/// the callback polls the reactor), that run happens after the callback returns.
///
/// ```
/// use reactor::Reactor;
/// use std::{cell::Cell, rc::Rc};
///
/// let r = Reactor::new()?;
/// let runs = Rc::new(Cell::new(0));
/// let runs2 = runs.clone();
/// let bh = r.bh(move |_| runs2.set(runs2.get() + 1));
/// bh.schedule();
/// bh.schedule(); // already scheduled: no-op
/// assert!(r.poll(false));
/// assert_eq!(runs.get(), 1);
/// assert!(!r.poll(false)); // ran once
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Bh {
    node: Arc<BhNode>,
}

impl Bh {
    pub(crate) fn new(node: Arc<BhNode>) -> Bh {
        Bh { node }
    }

    pub(crate) fn node(&self) -> &Arc<BhNode> {
        &self.node
    }

    /// Schedules the BH to run once in the reactor's next iteration.
    pub fn schedule(&self) {
        self.node.enqueue(SCHEDULED);
    }

    /// Schedules the BH as idle work: it runs when the reactor next iterates, which happens
    /// within about 10 ms, and its run does not count as progress. A [`schedule`](Self::schedule)
    /// before it runs makes it an ordinary schedule again.
    pub fn schedule_idle(&self) {
        self.node.enqueue(SCHEDULED | IDLE);
    }

    /// Cancels a pending schedule. A run already under way is not interrupted.
    pub fn cancel(&self) {
        self.node.link.cancel();
    }

    /// Whether the BH is scheduled and has not run yet.
    pub fn is_scheduled(&self) -> bool {
        self.node.link.flags() & SCHEDULED != 0
    }
}

impl Drop for Bh {
    fn drop(&mut self) {
        // The home thread frees the node (and drops the callback) when it dequeues it.
        self.node.enqueue(DELETED);
    }
}

impl std::fmt::Debug for Bh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bh")
            .field("scheduled", &self.is_scheduled())
            .finish()
    }
}
