//! The home thread's side of BHs: the registry of nodes it keeps alive, its queues, and what
//! a dequeue does with each kind of node.

use std::cell::{Cell, RefCell};

use slab::Slab;

use super::fifo::{Fifo, Peek, peek_list};
use super::node::{BhNode, Callback, Kind, Queued};
use crate::event_loop::Reactor;
use crate::lockfree::protocol::{DELETED, IDLE, List, SCHEDULED};
use crate::lockfree::sync::Arc;

/// The home thread's BH state: the registry of persistent nodes and the run queue.
pub(crate) struct BhHome {
    /// `Bh`s, timers and tasks, so their callbacks can be dropped on this thread when the
    /// reactor goes, and so that they stay alive while queued ([`QueueRef::Registry`]).
    ///
    /// [`QueueRef::Registry`]: super::node::QueueRef::Registry
    registry: RefCell<Slab<Arc<BhNode>>>,
    /// Taken nodes not yet dequeued. A nested poll continues it, which gives the "outer slice
    /// first" rule.
    run: Fifo,
    /// Nodes the home thread scheduled itself while polling, not yet taken: the local
    /// counterpart of the shared list, appended to the run queue by the same take.
    local: Fifo,
    /// The registry's references to nodes released since the last [`poll`](Self::poll)
    /// ended: a released node is freed only there, when no function up the stack still holds
    /// it as a `&BhNode` argument (the dequeue that released it, the run that finished it).
    released: RefCell<Vec<Arc<BhNode>>>,
    /// Whether `released` holds any: what each `poll` checks (a load, not a `RefCell` borrow).
    any_released: Cell<bool>,
}

impl BhHome {
    pub(crate) fn new() -> Self {
        BhHome {
            registry: RefCell::new(Slab::new()),
            run: Fifo::new(),
            local: Fifo::new(),
            released: RefCell::new(Vec::new()),
            any_released: Cell::new(false),
        }
    }

    /// Queues `node`, whose PENDING bit the caller has just set, on the local queue. Home
    /// thread only (through `BhNode::enqueue`, while this reactor polls).
    pub(super) fn push_local(&self, node: &BhNode) {
        node.push_ref();
        // SAFETY: the caller has just set the node's PENDING bit; `push_ref` took the queue's
        // reference if the node's kind needs one.
        unsafe { self.local.push(&node.link) };
    }

    /// Registers a node (`Bh`, timer, task): the registry keeps it alive until it is released.
    pub(crate) fn register(&self, node: &Arc<BhNode>) {
        let key = self.registry.borrow_mut().insert(node.clone());
        node.home().key.set(key);
    }

    /// Number of live persistent BHs and timers.
    pub(crate) fn registered(&self) -> usize {
        self.registry.borrow().len()
    }

    /// What is pending, for the timeout: the run queue, the local queue, then the shared list.
    pub(crate) fn peek(&self, list: &List) -> Peek {
        let queued = self.run.peek().max_with(self.local.peek());
        if queued == Peek::Due {
            return Peek::Due;
        }
        peek_list(list).max_with(queued)
    }

    /// Appends the local queue, then the shared list (SP7, oldest first), to the run queue.
    fn take(&self, list: &List) {
        self.run.append_all(&self.local);
        self.run.append_taken(list);
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
            let Some(queued) = self.pop() else { break };
            progress |= self.dequeue(r, queued);
        }
        if self.any_released.get() {
            self.free_released();
        }
        progress
    }

    /// Frees the nodes released since the last call (their callbacks are gone already, so no
    /// user code runs here). Called where no `&BhNode` argument is live: at the end of `poll`,
    /// whose nested polls run inside a callback, never between a release and the return of
    /// the function that released.
    fn free_released(&self) {
        self.any_released.set(false);
        loop {
            let node = self.released.borrow_mut().pop();
            match node {
                Some(node) => drop(node),
                None => break,
            }
        }
    }

    /// Takes the oldest node off the run queue, with what keeps it alive from here.
    fn pop(&self) -> Option<Queued<'_>> {
        let p = self.run.pop()?;
        // SAFETY: `p` has just been unlinked from the run queue by this thread.
        Some(unsafe { BhNode::unqueue(p) })
    }

    /// Registers a node created on another thread (a task from `Handle::spawn`), unless it
    /// already finished (aborted before it got here).
    pub(crate) fn adopt(&self, node: &Arc<BhNode>) {
        let cb = node.home().take_callback();
        let live = !matches!(cb, Callback::Empty);
        node.home().callback.set(cb);
        if live {
            self.register(node);
        }
    }

    /// SP8 (clears PENDING), then what the node's kind does with the flags it had.
    fn dequeue(&self, r: &Reactor, queued: Queued<'_>) -> bool {
        match queued {
            Queued::Registered(node) => {
                let old = node.link.unmark();
                if node.kind() == Kind::Timer {
                    self.dequeue_timer(r, node, old);
                    return false;
                }
                self.dequeue_bh(r, node, old)
            }
            Queued::Owned(node) => {
                let old = node.link.unmark();
                match node.kind() {
                    Kind::Task => self.dequeue_task(r, &node, old),
                    Kind::OneShotTimer => {
                        // The timer heap owns it from here.
                        r.timers().insert_oneshot(node);
                        false
                    }
                    _ => dequeue_oneshot(r, &node, old),
                }
            }
        }
    }

    /// A `Bh`: runs it if scheduled and not deleted; frees it if deleted.
    fn dequeue_bh(&self, r: &Reactor, node: &BhNode, old: u32) -> bool {
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

    /// A `Timer`: its deadline changed (into the heap), or it was deleted (freed).
    fn dequeue_timer(&self, r: &Reactor, node: &BhNode, old: u32) {
        if old & DELETED != 0 {
            self.release(node);
        } else if old & SCHEDULED != 0 {
            r.timers().sync(node.arc());
        }
    }

    /// A task: polls it if it was woken (and not cancelled meanwhile).
    fn dequeue_task(&self, r: &Reactor, node: &BhNode, old: u32) -> bool {
        if old & SCHEDULED == 0 {
            return false;
        }
        r.count_task();
        let _budget = r.io_budget().task_poll();
        self.call(r, node);
        true
    }

    /// Runs a registered node's callback (`Bh`, `Timer`, `Task`): takes it out, runs it, puts
    /// it back (also when it panics), unless the node was deleted meanwhile. If the callback
    /// is already running further up the stack, the run is postponed until it returns.
    pub(crate) fn call(&self, r: &Reactor, node: &BhNode) {
        let h = node.home();
        if h.running.get() {
            h.rerun.set(true);
            return;
        }
        let cb = match h.take_callback() {
            cb @ (Callback::Many(_) | Callback::Task(_)) => cb,
            other => {
                h.callback.set(other);
                return;
            }
        };
        h.running.set(true);
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
        let h = node.home();
        h.running.set(false);
        if h.free_pending.get() || done {
            drop(cb); // user code may run here: no borrow is held
            self.unregister(node);
            return;
        }
        h.callback.set(cb);
        if h.rerun.replace(false) {
            if node.kind() == Kind::Timer {
                r.timers().rearm_now(node);
            } else {
                node.enqueue(SCHEDULED);
            }
        }
    }

    /// Frees a deleted registered node: drops its callback here, on the home thread, and lets
    /// go of the registry's reference. Postponed if the callback is running.
    fn release(&self, node: &BhNode) {
        let h = node.home();
        if h.running.get() {
            h.free_pending.set(true);
            return;
        }
        drop(h.take_callback()); // user code may run here: no borrow is held
        self.unregister(node);
    }

    /// Lets go of the registry's reference (once: later calls do nothing). The node is freed
    /// when `poll` ends (`released`), not here: callers up the stack still hold `node`.
    fn unregister(&self, node: &BhNode) {
        let key = node.home().key.replace(usize::MAX);
        let arc = self.registry.borrow_mut().try_remove(key);
        if let Some(arc) = arc {
            self.released.borrow_mut().push(arc);
            self.any_released.set(true);
        }
    }

    /// Tears down at reactor drop: closes the list, lets go of every queued node, and drops
    /// every registered callback on this thread.
    pub(crate) fn shutdown(&self, list: &List) {
        self.run.append_closed(list);
        self.run.append_all(&self.local);
        while let Some(queued) = self.pop() {
            drop(queued); // gives back the queue's reference, if it had one
        }
        let nodes: Vec<Arc<BhNode>> = self.registry.borrow_mut().drain().collect();
        for node in &nodes {
            drop(node.home().take_callback());
        }
        self.free_released();
    }
}

/// A one-shot BH: runs it if still scheduled; the dequeue's reference frees it afterwards.
fn dequeue_oneshot(r: &Reactor, node: &BhNode, old: u32) -> bool {
    if old & SCHEDULED == 0 {
        return false;
    }
    r.count_bh();
    run_once(r, node);
    true
}

/// Runs a one-shot node's callback (a one-shot BH, or a one-shot timer from the heap).
pub(crate) fn run_once(r: &Reactor, node: &BhNode) {
    if let Callback::Once(f) = node.home().take_callback() {
        f(r);
    }
}
