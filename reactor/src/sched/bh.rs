//! Bottom halves: the lock-free BH list, BH flags, the home thread's run queue, and [`Bh`].
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
//! Queues: other threads push on the shared lock-free list; the home thread, when it schedules
//! work for its own reactor while that reactor polls, appends to a local queue instead (no
//! atomic besides the node's flags). Each take appends both to the run queue.
//!
//! Memory: a node on a queue (shared, local or run queue) is kept alive by the home thread's
//! registry (persistent BHs, until the home thread dequeues it with DELETED set) or is owned by
//! the list itself (one-shots, pushed with `Arc::into_raw`; tasks, whose list reference is taken
//! at each push). The `next` link of a node is only written by whoever set its PENDING bit (SP1)
//! and only read by the home thread before it clears PENDING again (SP8).
//!
//! The flags, the list and the synchronisation points SP1–SP8 live in `lockfree/protocol.rs`.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::ptr;

use slab::Slab;

pub(crate) use crate::lockfree::protocol::{
    DELETED, IDLE, ONESHOT, PENDING, SCHEDULED, TASK, TIMER,
};
use crate::lockfree::protocol::{Link, List};
use crate::lockfree::sync::{Arc, AtomicU64};
use crate::reactor::{Reactor, Shared};

/// The wait bound while only idle BHs are scheduled.
pub(crate) const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(10);

/// A callback that runs each time its node is due.
pub(crate) type ManyCallback = Box<dyn FnMut(&Reactor)>;

/// A task's future, polled each time the task is woken.
pub(crate) type TaskFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// What a node runs.
pub(crate) enum Callback {
    /// Taken out while it runs (or already consumed or dropped).
    Empty,
    Many(ManyCallback),
    Once(Box<dyn FnOnce(&Reactor)>),
    Task(TaskFuture),
}

/// Node state that only the home thread touches.
pub(crate) struct Home {
    pub(crate) callback: Callback,
    /// Slot in the registry (persistent nodes).
    key: usize,
    /// The callback is taken out and running further up the stack.
    running: bool,
    /// It became due again while running (in a nested poll): run it once more afterwards.
    rerun: bool,
    /// It was deleted while running: free it when the run ends.
    free_pending: bool,
    /// Timers: sequence number of the latest heap entry; older entries are stale.
    pub(crate) armed_seq: u64,
}

/// A BH, timer, task or one-shot: flags and link shared with producers, plus home-only state.
/// `link` comes first (`repr(C)`), so a `*const Link` from the list is the node's address.
#[repr(C)]
pub(crate) struct BhNode {
    pub(crate) link: Link,
    /// Timers: the requested deadline in reactor nanoseconds, [`DISARMED`] when not armed.
    pub(crate) deadline: AtomicU64,
    pub(crate) shared: Arc<Shared>,
    home: UnsafeCell<Home>,
}

/// `deadline` of a timer that is not armed.
pub(crate) const DISARMED: u64 = u64::MAX;

// SAFETY: producers on other threads touch only the atomics (`link`, `deadline`) and
// `shared` (itself Send + Sync). `home`, which may hold a callback that is not `Send`, is only
// accessed by the home thread: through `Reactor` methods (a `Reactor` is `!Send`, so they run on
// the thread that created it) and while the node is reachable from that reactor alone.
unsafe impl Send for BhNode {}
// SAFETY: as for `Send`.
unsafe impl Sync for BhNode {}

impl BhNode {
    pub(crate) fn new(shared: &Arc<Shared>, fixed: u32, callback: Callback) -> Arc<BhNode> {
        Arc::new(BhNode {
            link: Link::new(fixed),
            deadline: AtomicU64::new(DISARMED),
            shared: shared.clone(),
            home: UnsafeCell::new(Home {
                callback,
                key: usize::MAX,
                running: false,
                rerun: false,
                free_pending: false,
                armed_seq: 0,
            }),
        })
    }

    /// The home-only state.
    ///
    /// # Safety
    /// Only on the node's home thread, and the returned reference must be dead before any user
    /// code runs or any other `home_mut` reference to this node is made.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn home_mut(&self) -> &mut Home {
        // SAFETY: the caller guarantees home-thread, non-overlapping access.
        unsafe { &mut *self.home.get() }
    }

    /// Schedules the node with `new` flags (SP1, then SP2 or SP3) and wakes the home thread if
    /// it may sleep (SP4). Returns `false` if the reactor is gone (nothing was queued).
    ///
    /// On the home thread, while its reactor polls (a callback, a task, a completion scheduling
    /// work for the same reactor), the node goes on the home thread's local queue instead: no
    /// CAS, no fence and no take for it, since no other thread is involved and the reactor is
    /// awake. Only SP1 stays, because other threads may schedule the same node.
    ///
    /// The list refers to the node by its address. For a persistent node that reference is
    /// borrowed from the registry; for a one-shot, the caller has leaked one `Arc` reference
    /// (`Arc::into_raw`) that the list then owns, and takes it back if this returns `false`.
    pub(crate) fn enqueue(&self, new: u32) -> bool {
        let old = self.link.mark(new);
        let local = Reactor::with_current_for(&self.shared, |r| {
            if old & PENDING == 0 {
                r.bhs().push_local(self, old);
            }
        });
        if local.is_some() {
            // Queued locally now, or already queued somewhere: the awake home thread runs it.
            return true;
        }
        if old & PENDING == 0 {
            let task = old & TASK != 0;
            if task {
                // SAFETY: every node lives in an `Arc`; this reference is the list's own.
                unsafe { Arc::increment_strong_count(self) };
            }
            if self.shared.notifier.push(&self.link).is_err() {
                if task {
                    // SAFETY: takes back the reference added just above; the caller's own
                    // reference keeps the node alive.
                    unsafe { Arc::decrement_strong_count(self) };
                }
                return false;
            }
            return true;
        }
        // Already queued: it runs when the home thread dequeues it. The notification makes a
        // waiting reactor iterate once more, as every schedule does.
        self.shared.notifier.notify().is_ok()
    }
}

/// What the timeout computation needs to know of pending BHs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peek {
    Nothing,
    Idle,
    Due,
}

/// Walks a chain of nodes from `p`, classifying them.
fn walk(mut p: *mut Link) -> Peek {
    let mut seen = Peek::Nothing;
    while !p.is_null() {
        // SAFETY: nodes on the list or the run queue are alive (see the module docs).
        let link = unsafe { &*p };
        let f = link.flags();
        if f & (SCHEDULED | DELETED) == SCHEDULED && f & TIMER == 0 {
            if f & IDLE == 0 {
                return Peek::Due;
            }
            seen = Peek::Idle;
        } else if f & TIMER != 0 && f & SCHEDULED != 0 {
            return Peek::Due; // a timer changed: re-sync before sleeping
        }
        // SAFETY: the link is PENDING (on the list or run queue), so its `next` is stable.
        p = unsafe { link.next() };
    }
    seen
}

/// The home thread's BH state: the registry of persistent nodes and the run queue.
pub(crate) struct BhHome {
    /// Persistent BHs and timers, so their callbacks can be dropped on this thread when the
    /// reactor goes, and so that they stay alive while on the list.
    registry: RefCell<Slab<Arc<BhNode>>>,
    /// FIFO of taken nodes not yet dequeued (linked through `next`, PENDING still set). A
    /// nested poll continues it, which gives the "outer slice first" rule.
    head: Cell<*mut Link>,
    tail: Cell<*mut Link>,
    /// FIFO of nodes the home thread scheduled itself while polling, not yet taken (linked
    /// through `next`, PENDING set): the local counterpart of the shared list, appended to the
    /// run queue by the same take.
    local_head: Cell<*mut Link>,
    local_tail: Cell<*mut Link>,
}

impl BhHome {
    pub(crate) fn new() -> Self {
        BhHome {
            registry: RefCell::new(Slab::new()),
            head: Cell::new(ptr::null_mut()),
            tail: Cell::new(ptr::null_mut()),
            local_head: Cell::new(ptr::null_mut()),
            local_tail: Cell::new(ptr::null_mut()),
        }
    }

    /// Queues `node`, whose PENDING bit the caller has just set (its flags were `old`), on the
    /// local queue. Home thread only.
    fn push_local(&self, node: &BhNode, old: u32) {
        if old & TASK != 0 {
            // SAFETY: every node lives in an `Arc`; this reference is the queue's own, as on
            // the shared list.
            unsafe { Arc::increment_strong_count(node) };
        }
        let link = ptr::from_ref(&node.link).cast_mut();
        // SAFETY: the caller owns the PENDING bit of the node, which keeps it alive (see the
        // module docs) and makes this thread the only one to touch its link.
        unsafe { (*link).set_next(ptr::null_mut()) };
        match self.local_tail.get() {
            t if t.is_null() => self.local_head.set(link),
            // SAFETY: the tail is a locally queued node, alive and linked only by this thread.
            t => unsafe { (*t).set_next(link) },
        }
        self.local_tail.set(link);
    }

    /// Registers a persistent node.
    pub(crate) fn register(&self, node: &Arc<BhNode>) {
        let key = self.registry.borrow_mut().insert(node.clone());
        // SAFETY: home thread (called from a `Reactor` method), no other reference alive.
        unsafe { node.home_mut() }.key = key;
    }

    /// Number of live persistent BHs and timers.
    pub(crate) fn registered(&self) -> usize {
        self.registry.borrow().len()
    }

    /// What is pending, for the timeout: the run queue, the local queue, then the shared list.
    pub(crate) fn peek(&self, list: &List) -> Peek {
        let queued = walk(self.head.get()).max_with(walk(self.local_head.get()));
        if queued == Peek::Due {
            return Peek::Due;
        }
        walk(list.peek()).max_with(queued)
    }

    /// Appends the local queue, then the shared list (SP7, oldest first), to the run queue.
    fn take(&self, list: &List) {
        let local = self.local_head.replace(ptr::null_mut());
        if !local.is_null() {
            self.append(local, self.local_tail.replace(ptr::null_mut()));
        }
        let (mut p, _) = list.take();
        if p.is_null() {
            return;
        }
        let newest = p;
        let mut reversed: *mut Link = ptr::null_mut();
        while !p.is_null() {
            // SAFETY: taken nodes are alive and, PENDING being set, only this thread touches
            // their links now.
            let next = unsafe { (*p).next() };
            // SAFETY: as above.
            unsafe { (*p).set_next(reversed) };
            reversed = p;
            p = next;
        }
        self.append(reversed, newest);
    }

    /// Appends the chain `first`..=`last` (linked through `next`, ending in null) to the run
    /// queue.
    fn append(&self, first: *mut Link, last: *mut Link) {
        match self.tail.get() {
            t if t.is_null() => self.head.set(first),
            // SAFETY: the tail is a queued node, alive and linked only by this thread.
            t => unsafe { (*t).set_next(first) },
        }
        self.tail.set(last);
    }

    /// Unlinks the oldest queued node; PENDING is still set.
    fn pop(&self) -> Option<*mut Link> {
        let p = self.head.get();
        if p.is_null() {
            return None;
        }
        // SAFETY: a queued node is alive; only this thread reads its link while PENDING.
        let next = unsafe { (*p).next() };
        self.head.set(next);
        if next.is_null() {
            self.tail.set(ptr::null_mut());
        }
        Some(p)
    }

    /// Runs every scheduled BH (the outer poll's remaining ones first). Returns `true` if a
    /// non-idle BH ran.
    ///
    /// At most `budget` task polls happen per call; the tasks and BHs behind them stay queued
    /// (making the next timeout zero), so that a storm of tasks waking each other cannot keep
    /// fd handlers and timers from their turn.
    pub(crate) fn poll(&self, r: &Reactor, budget: u32) -> bool {
        self.take(&r.shared().notifier.list);
        let mut progress = false;
        let tasks_before = r.task_polls();
        while r.task_polls() - tasks_before < u64::from(budget) {
            let Some(p) = self.pop() else { break };
            progress |= self.dequeue(r, p);
        }
        progress
    }

    /// Registers a node created on another thread (a task from `Handle::spawn`), unless it
    /// already finished (aborted before it got here).
    pub(crate) fn adopt(&self, node: &Arc<BhNode>) {
        // SAFETY: home thread; the reference dies in this statement.
        if !matches!(unsafe { node.home_mut() }.callback, Callback::Empty) {
            self.register(node);
        }
    }

    /// SP8 and what follows: clears PENDING and acts on the flags the node had.
    fn dequeue(&self, r: &Reactor, p: *mut Link) -> bool {
        let p = p.cast::<BhNode>();
        // SAFETY: see the module docs; `p` stays alive until this function frees it, and the
        // link is the first field of a `repr(C)` node.
        let node = unsafe { &*p };
        let old = node.link.unmark();
        let oneshot = old & ONESHOT != 0;
        if old & TIMER != 0 {
            if old & DELETED != 0 {
                self.release(node);
            } else if oneshot {
                // SAFETY: a one-shot timer's list reference came from `Arc::into_raw`; the
                // timer heap owns it from here.
                r.timers().insert_oneshot(unsafe { Arc::from_raw(p) });
            } else if old & SCHEDULED != 0 {
                // SAFETY: the registry holds a reference, so the count is at least 1.
                let arc = unsafe {
                    Arc::increment_strong_count(p);
                    Arc::from_raw(p)
                };
                r.timers().sync(arc);
            }
            return false;
        }
        if old & TASK != 0 {
            // SAFETY: the list owns one reference to a queued task node (see `enqueue`).
            let node = unsafe { Arc::from_raw(p) };
            if old & SCHEDULED != 0 {
                r.count_task();
                let _budget = r.io_budget().task_poll();
                self.call(r, &node);
                return true;
            }
            return false;
        }
        if oneshot {
            // SAFETY: a one-shot's list reference came from `Arc::into_raw`; it is ours now.
            let node = unsafe { Arc::from_raw(p) };
            if old & SCHEDULED != 0 {
                r.count_bh();
                run_once(r, &node);
                return true;
            }
            return false;
        }
        let mut progress = false;
        if old & (SCHEDULED | DELETED) == SCHEDULED {
            progress = old & IDLE == 0;
            r.count_bh();
            self.call(r, node);
        }
        if old & DELETED != 0 {
            self.release(node);
        }
        progress
    }

    /// Runs a persistent node's callback: takes it out, runs it, puts it back (also when it
    /// panics), unless the node was deleted meanwhile. If the callback is already running
    /// further up the stack, the run is postponed until it returns.
    pub(crate) fn call(&self, r: &Reactor, node: &BhNode) {
        let cb = {
            // SAFETY: home thread; the reference dies at the end of this block.
            let h = unsafe { node.home_mut() };
            if h.running {
                h.rerun = true;
                return;
            }
            match std::mem::replace(&mut h.callback, Callback::Empty) {
                cb @ (Callback::Many(_) | Callback::Task(_)) => {
                    h.running = true;
                    cb
                }
                other => {
                    h.callback = other;
                    return;
                }
            }
        };
        struct Finish<'a> {
            home: &'a BhHome,
            r: &'a Reactor,
            node: &'a BhNode,
            cb: Callback,
            /// A task's future completed.
            done: bool,
        }
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                let cb = std::mem::replace(&mut self.cb, Callback::Empty);
                self.home.finish(self.r, self.node, cb, self.done);
            }
        }
        let mut fin = Finish {
            home: self,
            r,
            node,
            cb,
            done: false,
        };
        match &mut fin.cb {
            Callback::Many(f) => f(r),
            Callback::Task(fut) => {
                let waker = crate::sched::task::waker_ref(node);
                let mut cx = std::task::Context::from_waker(&waker);
                fin.done = fut.as_mut().poll(&mut cx).is_ready();
            }
            Callback::Empty | Callback::Once(_) => {}
        }
    }

    /// The end of a run started by [`call`](Self::call): puts the callback back, or frees the
    /// node if it was deleted meanwhile or is a task whose future completed.
    fn finish(&self, r: &Reactor, node: &BhNode, cb: Callback, done: bool) {
        let (free, rerun) = {
            // SAFETY: home thread; the reference dies at the end of this block.
            let h = unsafe { node.home_mut() };
            h.running = false;
            if h.free_pending || done {
                (true, false)
            } else {
                (false, std::mem::take(&mut h.rerun))
            }
        };
        if free {
            drop(cb); // user code may run here: no borrow is held
            self.unregister(node);
            return;
        }
        // SAFETY: home thread; nothing else holds a reference to the home state now.
        unsafe { node.home_mut() }.callback = cb;
        if rerun {
            if node.link.flags() & TIMER != 0 {
                r.timers().rearm_now(node);
            } else {
                node.enqueue(SCHEDULED);
            }
        }
    }

    /// Frees a deleted persistent node: drops its callback here, on the home thread, and
    /// lets go of the registry's reference. Postponed if the callback is running.
    fn release(&self, node: &BhNode) {
        let cb = {
            // SAFETY: home thread; the reference dies at the end of this block.
            let h = unsafe { node.home_mut() };
            if h.running {
                h.free_pending = true;
                return;
            }
            std::mem::replace(&mut h.callback, Callback::Empty)
        };
        drop(cb); // user code may run here: no borrow is held
        self.unregister(node);
    }

    /// Lets go of the registry's reference (once: later calls do nothing).
    fn unregister(&self, node: &BhNode) {
        // SAFETY: home thread; the reference dies in this statement.
        let key = std::mem::replace(&mut unsafe { node.home_mut() }.key, usize::MAX);
        let arc = self.registry.borrow_mut().try_remove(key);
        drop(arc); // may free the node; its callback is already gone
    }

    /// Tears down at reactor drop: closes the list and drops every callback on this thread.
    pub(crate) fn shutdown(&self, list: &List) {
        let mut orphans = Vec::new();
        let mut p = list.close();
        while !p.is_null() {
            orphans.push(p);
            // SAFETY: a closed list's nodes are alive and linked only by this thread now.
            p = unsafe { (*p).next() };
        }
        let mut p = self.local_head.replace(ptr::null_mut());
        self.local_tail.set(ptr::null_mut());
        while !p.is_null() {
            orphans.push(p);
            // SAFETY: a locally queued node is alive and linked only by this thread.
            p = unsafe { (*p).next() };
        }
        while let Some(p) = self.pop() {
            orphans.push(p);
        }
        for p in orphans {
            // SAFETY: a node that was on the list or queue is alive.
            if unsafe { (*p).flags() } & (ONESHOT | TASK) != 0 {
                // SAFETY: the list owns a reference to queued one-shots and tasks; the link is
                // the node's address.
                drop(unsafe { Arc::from_raw(p.cast::<BhNode>()) });
            }
        }
        let nodes: Vec<Arc<BhNode>> = self.registry.borrow_mut().drain().collect();
        for node in &nodes {
            // SAFETY: home thread; the reference dies in this statement.
            let cb = std::mem::replace(&mut unsafe { node.home_mut() }.callback, Callback::Empty);
            drop(cb);
        }
    }
}

impl Peek {
    fn max_with(self, other: Peek) -> Peek {
        match (self, other) {
            (Peek::Due, _) | (_, Peek::Due) => Peek::Due,
            (Peek::Idle, _) | (_, Peek::Idle) => Peek::Idle,
            _ => Peek::Nothing,
        }
    }
}

/// Runs a one-shot node's callback (it owns the node).
pub(crate) fn run_once(r: &Reactor, node: &Arc<BhNode>) {
    // SAFETY: home thread; the reference dies in this statement.
    let cb = std::mem::replace(&mut unsafe { node.home_mut() }.callback, Callback::Empty);
    if let Callback::Once(f) = cb {
        f(r);
    }
}

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
