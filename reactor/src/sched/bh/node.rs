//! A node: what other threads touch (its flags and link, a timer's deadline), what only the
//! home thread touches ([`Home`]), and who owns the node's reference in each state
//! ([`Kind::queue_ref`]).
//!
//! # Who keeps a node alive
//!
//! Every node lives in an `Arc` from [`BhNode::new`]; its fields are private, so no node
//! exists anywhere else. The references, per kind and state:
//!
//! | kind | made by | while queued (the queue's reference) | while it runs | after it runs |
//! |---|---|---|---|---|
//! | `Bh`, `Timer` | `Reactor::bh`, `Reactor::timer` (registry + the user's handle) | borrowed from the registry ([`QueueRef::Registry`]) | registry | registered until the dequeue that sees `DELETED` releases it |
//! | `OneShot`, `OneShotTimer` | [`BhNode::post`] | the poster's, leaked to the queue ([`QueueRef::Posted`]) | the dequeue's (a timer: the heap's) | freed |
//! | `Task` | `spawn*` (registry + the `JoinHandle`) | one per push, taken by the push ([`QueueRef::PerPush`]) | the dequeue's, plus the registry | registered until the future completes; wakers hold their own |
//!
//! [`BhNode::enqueue`] (a push) and [`BhNode::unqueue`] (a dequeue) are the only code that
//! converts the queue's reference, and both read the table from `queue_ref`. A released node's
//! registry reference is dropped when `BhHome::poll` ends, not at the release: the functions
//! that released it still hold it as a `&BhNode` argument.

use std::cell::Cell;

use crate::event_loop::{Reactor, Remote};
use crate::lockfree::protocol::{Link, ONESHOT, SCHEDULED, TASK, TIMER};
use crate::lockfree::sync::{Arc, AtomicU64};

use crate::sched::clock::DISARMED;

/// A callback that runs each time its node is due.
pub(crate) type ManyCallback = Box<dyn FnMut(&Reactor)>;

/// A task's future, polled each time the task is woken.
pub(crate) type TaskFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// What a node runs.
pub(crate) enum Callback {
    /// Taken out while it runs (or already consumed or dropped).
    Empty,
    /// `Bh` and `Timer`.
    Many(ManyCallback),
    /// `OneShot` and `OneShotTimer`.
    Once(Box<dyn FnOnce(&Reactor)>),
    /// `Task`.
    Task(TaskFuture),
}

/// What a node is: fixed when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A [`Bh`](super::Bh): runs each time it is scheduled.
    Bh,
    /// A [`Timer`](crate::Timer): a schedule means "my deadline changed".
    Timer,
    /// `oneshot`: runs once, then frees itself.
    OneShot,
    /// `oneshot_after`/`oneshot_at`: goes into the timer heap, runs once when due.
    OneShotTimer,
    /// A task: its future is polled each time it is woken (scheduled).
    Task,
}

/// Who owns the reference that keeps a queued node alive (the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueRef {
    /// The home thread's registry holds the node from its creation until it is released; the
    /// queue borrows that reference.
    Registry,
    /// The one who posted the node gave its reference to the queue (`Arc::into_raw`); the
    /// dequeue takes it over.
    Posted,
    /// Each push takes a reference and each dequeue takes it over: the node may be queued many
    /// times while wakers on any thread hold other references.
    PerPush,
}

impl Kind {
    /// Who owns a queued node's reference.
    pub(crate) const fn queue_ref(self) -> QueueRef {
        match self {
            Kind::Bh | Kind::Timer => QueueRef::Registry,
            Kind::OneShot | Kind::OneShotTimer => QueueRef::Posted,
            Kind::Task => QueueRef::PerPush,
        }
    }

    /// The flags fixed at creation, which the protocol's readers (`peek`) look at.
    const fn fixed_flags(self) -> u32 {
        match self {
            Kind::Bh => 0,
            Kind::Timer => TIMER,
            Kind::OneShot => ONESHOT,
            Kind::OneShotTimer => ONESHOT | TIMER,
            Kind::Task => TASK,
        }
    }
}

/// Node state that only the home thread touches. Each field is a `Cell`, so no reference into
/// it outlives a call; that it is only touched on the home thread is argued once, at
/// `BhNode`'s `Sync`.
pub(crate) struct Home {
    pub(crate) callback: Cell<Callback>,
    /// Slot in the registry (`Bh`, `Timer`, `Task`), `usize::MAX` when not registered.
    pub(crate) key: Cell<usize>,
    /// The callback is taken out and running further up the stack.
    pub(crate) running: Cell<bool>,
    /// It became due again while running (in a nested poll): run it once more afterwards.
    pub(crate) rerun: Cell<bool>,
    /// It was deleted while running: free it when the run ends.
    pub(crate) free_pending: Cell<bool>,
    /// Timers: sequence number of the latest heap entry; older entries are stale.
    pub(crate) armed_seq: Cell<u64>,
}

impl Home {
    /// Takes the callback out (leaving `Empty`).
    pub(crate) fn take_callback(&self) -> Callback {
        self.callback.replace(Callback::Empty)
    }
}

/// A BH, timer, task or one-shot: flags and link shared with producers, plus home-only state.
/// `link` comes first (`repr(C)`), so a `*const Link` from the list is the node's address.
#[repr(C)]
pub(crate) struct BhNode {
    pub(crate) link: Link,
    /// Timers: the requested deadline in reactor nanoseconds, [`DISARMED`] when not armed.
    pub(crate) deadline: AtomicU64,
    pub(crate) shared: Arc<Remote>,
    kind: Kind,
    home: Home,
}

// SAFETY: producers on other threads touch only the atomics (`link`, `deadline`), `shared`
// (itself Send + Sync) and `kind` (immutable). `home`, which may hold a callback that is not
// `Send`, is reached only through `BhNode::home`, whose callers are the home thread's own
// parts of a reactor: `BhHome` (home.rs), `Timers` and `run_once`. Each belongs to a `Reactor`
// (which is `!Send`, so they run on the thread that created it) and only ever holds that
// reactor's nodes. The last reference may be dropped on any thread; by then the callback has
// been dropped on the home thread (released, finished, or drained at shutdown), except for a
// one-shot that never got queued, whose callback is `Send` or was posted on the home thread.
unsafe impl Send for BhNode {}
// SAFETY: as for `Send`.
unsafe impl Sync for BhNode {}

impl BhNode {
    pub(crate) fn new(shared: &Arc<Remote>, kind: Kind, callback: Callback) -> Arc<BhNode> {
        Arc::new(BhNode {
            link: Link::new(kind.fixed_flags()),
            deadline: AtomicU64::new(DISARMED),
            shared: shared.clone(),
            kind,
            home: Home {
                callback: Cell::new(callback),
                key: Cell::new(usize::MAX),
                running: Cell::new(false),
                rerun: Cell::new(false),
                free_pending: Cell::new(false),
                armed_seq: Cell::new(0),
            },
        })
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    /// The home-only state: for `BhHome`, `Timers` and `run_once` only (see the `Sync` impl).
    pub(in crate::sched) fn home(&self) -> &Home {
        &self.home
    }

    /// Another reference to this node.
    pub(crate) fn arc(&self) -> Arc<BhNode> {
        // SAFETY: every node lives in an `Arc` (`new` is the only constructor), and `&self`
        // is only valid while some reference keeps that `Arc` alive, so the count is >= 1.
        unsafe {
            Arc::increment_strong_count(self);
            Arc::from_raw(self)
        }
    }

    /// Queues a one-shot node ([`QueueRef::Posted`]): the queue owns `node`'s reference from
    /// here. Gives it back if the reactor is gone.
    pub(crate) fn post(node: Arc<BhNode>) -> Result<(), Arc<BhNode>> {
        debug_assert_eq!(node.kind.queue_ref(), QueueRef::Posted);
        let p = Arc::into_raw(node);
        // SAFETY: `p` holds the reference leaked just above; the node is alive.
        if unsafe { &*p }.enqueue(SCHEDULED) {
            Ok(())
        } else {
            // SAFETY: the push failed, so the queue did not take the leaked reference.
            Err(unsafe { Arc::from_raw(p) })
        }
    }

    /// A push is about to queue this node (the caller set its PENDING bit): takes the queue's
    /// reference if the kind's [`QueueRef`] says a push does.
    pub(super) fn push_ref(&self) {
        if self.kind.queue_ref() == QueueRef::PerPush {
            // SAFETY: as in `arc`; the reference taken is the queue's, given back by `unqueue`.
            unsafe { Arc::increment_strong_count(self) };
        }
    }

    /// Undoes [`push_ref`](Self::push_ref) after a push that failed (the reactor is gone).
    fn unpush_ref(&self) {
        if self.kind.queue_ref() == QueueRef::PerPush {
            // SAFETY: gives back the reference `push_ref` took; the caller's keeps the node.
            unsafe { Arc::decrement_strong_count(self) };
        }
    }

    /// Schedules the node with `new` flags (SP1, then SP2 or SP3) and wakes the home thread if
    /// it may sleep (SP4). Returns `false` if the reactor is gone (nothing was queued).
    ///
    /// On the home thread, while its reactor polls (a callback, a task, a completion scheduling
    /// work for the same reactor), the node goes on the home thread's local queue instead: no
    /// CAS, no fence and no take for it, since no other thread is involved and the reactor is
    /// awake. Only SP1 stays, because other threads may schedule the same node.
    pub(crate) fn enqueue(&self, new: u32) -> bool {
        let old = self.link.mark(new);
        let pushed = old & crate::lockfree::protocol::PENDING == 0;
        let local = Reactor::with_current_for(&self.shared, |r| {
            if pushed {
                r.bhs().push_local(self);
            }
        });
        if local.is_some() {
            // Queued locally now, or already queued somewhere: the awake home thread runs it.
            return true;
        }
        if pushed {
            self.push_ref();
            if self.shared.notifier.push(&self.link).is_err() {
                self.unpush_ref();
                return false;
            }
            return true;
        }
        // Already queued: it runs when the home thread dequeues it. The notification makes a
        // waiting reactor iterate once more, as every schedule does.
        self.shared.notifier.notify().is_ok()
    }

    /// Takes a node off a queue, with what keeps it alive from here (the table's "while
    /// queued" column).
    ///
    /// # Safety
    /// `p` is the link of a node that this thread has just unlinked from a queue (the run
    /// queue, the local queue, or a closed list); its PENDING bit is still set.
    pub(super) unsafe fn unqueue<'a>(p: *mut Link) -> Queued<'a> {
        let p = p.cast::<BhNode>();
        // SAFETY: a queued node is alive (the caller's contract and the table), and the link
        // is the first field of a `repr(C)` node.
        let node = unsafe { &*p };
        match node.kind.queue_ref() {
            QueueRef::Registry => Queued::Registered(node),
            // SAFETY: the queue owned one reference (posted or taken by the push): ours now.
            QueueRef::Posted | QueueRef::PerPush => Queued::Owned(unsafe { Arc::from_raw(p) }),
        }
    }
}

/// A node just taken off a queue.
pub(super) enum Queued<'a> {
    /// Kept alive by the registry until this thread releases it.
    Registered(&'a BhNode),
    /// The queue's reference, now the dequeue's.
    Owned(Arc<BhNode>),
}
