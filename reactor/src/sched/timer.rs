//! Timers with nanosecond deadlines, and the heap of armed timers.
//!
//! A timer is a BH node with the `TIMER` flag: its callback, deletion and teardown follow the
//! BH rules, and a "schedule" of a timer node means "my deadline changed". Arming stores the
//! deadline in the node; on the home thread (inside a callback) it also goes straight into the
//! heap, and from any other thread it schedules the node, which wakes the reactor and lets the
//! home thread pick up the new deadline before it computes its next timeout.
//!
//! The heap is lazy: re-arming pushes a new entry and leaves the old one behind. An entry is
//! live only while it is the node's latest (`armed_seq`), its deadline is still the node's, and
//! the node is not deleted; stale entries are dropped when they reach the top, and the heap is
//! compacted when it grows to many times its live size.

use std::cell::{Cell, RefCell};
use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crate::event_loop::Reactor;
use crate::lockfree::sync::{Arc, Ordering};
use crate::sched::bh::{self, BhNode, DELETED, Kind, SCHEDULED};
use crate::sched::clock::{DISARMED, ns_after};

struct Entry {
    deadline: u64,
    seq: u64,
    node: Arc<BhNode>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest deadline first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.deadline, other.seq).cmp(&(self.deadline, self.seq))
    }
}

impl Entry {
    fn is_live(&self) -> bool {
        // A snapshot of the flags: DELETED is only ever added, and a stale "not deleted" answer
        // is caught again when the dequeue of the deleted node drops its callback.
        self.node.link.flags() & DELETED == 0
            && self.node.home().armed_seq.get() == self.seq
            // Acquire: pairs with the release store of the deadline in `Timer::arm_ns`.
            && self.node.deadline.load(Ordering::Acquire) == self.deadline
    }
}

/// The home thread's armed timers.
pub(crate) struct Timers {
    heap: RefCell<BinaryHeap<Entry>>,
    seq: Cell<u64>,
    /// Entries armed while timers were being run; they wait for the next run.
    later: RefCell<Vec<Entry>>,
    /// Heap size after the last compaction.
    compacted: Cell<usize>,
}

impl Timers {
    pub(crate) fn new() -> Self {
        Timers {
            heap: RefCell::new(BinaryHeap::new()),
            seq: Cell::new(0),
            later: RefCell::new(Vec::new()),
            compacted: Cell::new(0),
        }
    }

    /// Adds a heap entry for `node` at `deadline`, which becomes the node's only live entry.
    pub(crate) fn push(&self, node: Arc<BhNode>, deadline: u64) {
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        node.home().armed_seq.set(seq);
        let mut heap = self.heap.borrow_mut();
        heap.push(Entry {
            deadline,
            seq,
            node,
        });
        if heap.len() > 64 && heap.len() > 4 * self.compacted.get().max(16) {
            heap.retain(Entry::is_live);
            self.compacted.set(heap.len());
        }
    }

    /// A timer node was scheduled: its deadline changed on some thread.
    pub(crate) fn sync(&self, node: Arc<BhNode>) {
        // Acquire: pairs with the release store in `Timer::arm_ns`.
        let deadline = node.deadline.load(Ordering::Acquire);
        if deadline != DISARMED {
            self.push(node, deadline);
        }
    }

    /// A one-shot timer arrived from another thread; the heap owns it from now on.
    pub(crate) fn insert_oneshot(&self, node: Arc<BhNode>) {
        self.sync(node);
    }

    /// Re-arms `node` to fire at once (a timer that came due while its callback was running).
    pub(crate) fn rearm_now(&self, node: &BhNode) {
        // Release: pairs with the acquire loads in `Entry::is_live` and `sync`.
        node.deadline.store(0, Ordering::Release);
        self.push(node.arc(), 0);
    }

    /// The earliest live deadline, dropping stale entries on the way.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        let mut heap = self.heap.borrow_mut();
        while let Some(top) = heap.peek() {
            if top.is_live() {
                return Some(top.deadline);
            }
            heap.pop();
        }
        None
    }

    /// Runs the timers due at `now`. Timers armed by these callbacks wait for the next run,
    /// even if already due, so that a timer re-arming itself for "now" cannot starve the loop.
    pub(crate) fn run(&self, r: &Reactor, now: u64) -> bool {
        let start = self.seq.get();
        let mut fired = false;
        loop {
            let entry = {
                let mut heap = self.heap.borrow_mut();
                match heap.peek() {
                    Some(top) if top.deadline <= now => heap.pop().expect("peeked"),
                    _ => break,
                }
            };
            if entry.seq > start {
                self.later.borrow_mut().push(entry);
                continue;
            }
            // AcqRel: the CAS disarms only if no thread re-armed meanwhile (pairs with the
            // release store in `Timer::arm_ns`); a failure means a newer deadline will be synced.
            if !entry.is_live()
                || entry
                    .node
                    .deadline
                    .compare_exchange(
                        entry.deadline,
                        DISARMED,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_err()
            {
                continue;
            }
            fired = true;
            r.count_timer();
            if entry.node.kind() == Kind::OneShotTimer {
                bh::run_once(r, &entry.node);
            } else {
                r.bhs().call(r, &entry.node);
            }
        }
        let mut later = self.later.borrow_mut();
        if !later.is_empty() {
            self.heap.borrow_mut().extend(later.drain(..));
        }
        fired
    }

    /// Drops every entry (at reactor drop, on the home thread).
    pub(crate) fn shutdown(&self) {
        let entries = std::mem::take(&mut *self.heap.borrow_mut());
        drop(entries);
        self.later.borrow_mut().clear();
    }
}

/// A timer: a callback that runs on its reactor's thread when its deadline passes.
///
/// `Timer` is `Send + Sync`: arm, re-arm and cancel it from any thread; arming it from another
/// thread wakes the reactor so that the new deadline bounds its wait. Deadlines have nanosecond
/// resolution (how late a timer fires depends on the backend and the machine; the `bench`
/// crate measures it). Arming an armed timer moves its deadline; a timer fires at most once
/// per arming. The callback runs on the reactor's thread only and is dropped there when the
/// `Timer` is dropped. Deadlines saturate: `arm_after(Duration::MAX)` is a timer that never
/// fires in practice, without overflow.
///
/// ```
/// use reactor::Reactor;
/// use std::{cell::Cell, rc::Rc, time::Duration};
///
/// let r = Reactor::new()?;
/// let fired = Rc::new(Cell::new(false));
/// let f2 = fired.clone();
/// let t = r.timer(move |_| f2.set(true));
/// t.arm_after(Duration::from_millis(1));
/// r.run_until(|| fired.get());
/// assert!(!t.is_armed());
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Timer {
    node: Arc<BhNode>,
}

impl Timer {
    pub(crate) fn new(node: Arc<BhNode>) -> Timer {
        Timer { node }
    }

    /// Arms the timer to fire at `when` (at once if `when` has passed).
    pub fn arm_at(&self, when: Instant) {
        self.arm_ns(self.node.shared.clock.ns_of(when));
    }

    /// Arms the timer to fire `after` from now.
    pub fn arm_after(&self, after: Duration) {
        let now = self.node.shared.clock.now_ns();
        self.arm_ns(ns_after(now, after));
    }

    fn arm_ns(&self, deadline: u64) {
        // Release: pairs with the acquire loads of the home thread (`sync`, `Entry::is_live`).
        self.node.deadline.store(deadline, Ordering::Release);
        // On the home thread inside a poll: straight into the heap, no wakeup needed.
        let direct = Reactor::with_current_for(&self.node.shared, |r| {
            r.timers().push(self.node.clone(), deadline)
        });
        if direct.is_none() {
            self.node.enqueue(SCHEDULED);
        }
    }

    /// Disarms the timer. A callback already running is not interrupted.
    pub fn cancel(&self) {
        // Release: pairs with the acquire loads of the home thread; the stale heap entry is
        // dropped when it reaches the top.
        self.node.deadline.store(DISARMED, Ordering::Release);
    }

    /// Whether the timer is armed and has not fired yet.
    pub fn is_armed(&self) -> bool {
        // Relaxed: a snapshot.
        self.node.deadline.load(Ordering::Relaxed) != DISARMED
    }

    /// Time left until the deadline (zero if it has passed), or `None` if not armed.
    pub fn remaining(&self) -> Option<Duration> {
        // Relaxed: a snapshot.
        let d = self.node.deadline.load(Ordering::Relaxed);
        (d != DISARMED)
            .then(|| Duration::from_nanos(d.saturating_sub(self.node.shared.clock.now_ns())))
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.cancel();
        // The home thread frees the node and drops the callback when it dequeues it.
        self.node.enqueue(DELETED);
    }
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer")
            .field("remaining", &self.remaining())
            .finish()
    }
}
