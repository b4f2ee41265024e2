//! The lock-free core of the reactor: the BH flags, the BH list, and the wakeup protocol (QEMU's
//! `notify_me`/`notified`, with `notified` folded into the list's head), with every
//! synchronisation point (SP) of it.
//!
//! This file uses atomics only through `super::sync`, and nothing else from the crate, so that
//! the loom model checker compiles this very file against its own atomics (`reactor/tests/
//! loom.rs` includes it with a `sync` module of loom types). Each SP's ordering can be weakened
//! with `--cfg reactor_weaken="spN"`, which the loom models use to show that each one matters.
//!
//! Two words of shared state take part, on one cache line: the *announcement word*, which is
//! the BH list head ([`List`]) with a flag in its low bit, and the counter `notify_me`, which
//! only the home thread writes. The word is non-zero while work is announced and not yet taken:
//! nodes pushed on the list, or the `NOTIFIED` bit of a notification that carries no node (a
//! wakeup, a stop request). A producer wakes a sleeping reactor through its doorbell (an
//! eventfd, or an io_uring ring message) only when the home thread has announced that it may
//! sleep, and only if it is the first to announce work since the home thread last took it.
//!
//! ```text
//!  producer (schedule, wake, arm a timer)        home thread, Reactor::poll(blocking)
//!  -------------------------------------------   ------------------------------------------
//!  SP1  flags.fetch_or(PENDING|..)   AcqRel       1. timeout: 0 if BHs pending, else timers
//!  SP2  if PENDING was clear: push   Release      SP5  notify_me += 2; fence(SeqCst);
//!       (CAS of the word)                              load the word: != 0 -> timeout = 0
//!  SP3  else (nothing to push):                   2. wait on the fd monitor
//!       set NOTIFIED in the word     Release      3. notify_me -= 2
//!       the word was != 0 -> done                 SP7  take the word (swap with 0)   Acquire
//!  SP4  fence(SeqCst); load notify_me             SP8  per BH: read `next`, then
//!       != 0 -> ring the doorbell                      flags.fetch_and(!PENDING..)   AcqRel
//!                                                 SP6  at reactor drop: close (swap)  Acquire
//! ```
//!
//! Why nothing is lost and nothing runs twice:
//!
//! - **SP4 with SP5** (Dekker): each side writes (the word by its RMW / `notify_me`), passes a
//!   full fence, then loads the other's variable. Of two SeqCst fences one comes first, so at
//!   least one side sees the other's write: either the producer sees `notify_me != 0` and rings
//!   the doorbell, or the home thread sees the word non-zero and does not sleep. Never both
//!   missed.
//! - **SP2 and SP3 with SP7**: every write of the word is a read-modify-write (push, notify,
//!   take, close), so the home thread's acquire swap reads the latest announcements and
//!   synchronises with each release RMW before it (release sequences): a taken node's callback
//!   sees what its scheduler wrote before scheduling, and whatever a notifier wrote before
//!   notifying (a stop request) is visible once its announcement is taken. An announcement is
//!   consumed only by the take that also collects its work, so no fence is needed between the
//!   two (the old separate `notified` flag needed a fence on each side, because the home thread
//!   cleared it with a plain store that formed no release/acquire pair).
//! - **Already announced**: a producer whose RMW finds the word non-zero stops there: work is
//!   announced and not yet taken, the producer that announced it first owns the wakeup (its
//!   SP4/SP5 pair), and the home thread's next take collects this producer's work too. Under
//!   load most notifications are one RMW of the word and no fence.
//! - **SP1 with SP8**: the home thread unlinks a BH (reads its `next`) before clearing PENDING
//!   with release, and a producer sets PENDING with acquire before writing `next` to push it
//!   again, so the two never clobber the link. When PENDING was already set (the BH is queued,
//!   not yet run), SP1's release and SP8's acquire make the scheduler's writes visible to the
//!   callback. PENDING is set and cleared by single RMWs, so a BH is queued at most once and a
//!   schedule is consumed by at most one run.
//! - **SP6 with SP2**: when the reactor is dropped it closes the list with an acquire swap, so
//!   the nodes still on it (one-shots and tasks it must free) are seen fully published.
//!
//! Why one word: a busy-polling home thread spins on reading the line of the word, so a
//! producer's writes to it contend with those reads. A push that also announces is one RMW on
//! that line; a separate `notified` store and a second fence cost one more transfer of the line
//! per hand-over, measured with the bench's `pingpong-poll`.
//!
//! While the reactor is busy, `notify_me` is 0 and a producer makes no system call.

use std::ptr;

use super::sync::{AtomicPtr, AtomicU32, AtomicU64, Ordering, fence};

/// On the shared list or the home run queue. Set by the scheduler (SP1), cleared at dequeue.
pub(crate) const PENDING: u32 = 1;
/// Should run when dequeued.
pub(crate) const SCHEDULED: u32 = 2;
/// Scheduled as idle: not progress, bounds the wait to about 10 ms.
pub(crate) const IDLE: u32 = 4;
/// The handle was dropped: free at dequeue, never run.
pub(crate) const DELETED: u32 = 8;
/// Fixed at creation: freed after its one run.
pub(crate) const ONESHOT: u32 = 16;
/// Fixed at creation: a timer; a "schedule" means "my deadline changed".
pub(crate) const TIMER: u32 = 32;
/// Fixed at creation: a task; a schedule is a wake, a run is a poll of its future.
pub(crate) const TASK: u32 = 64;

/// `strong`, or `weak` when built with `--cfg reactor_weaken="<sp>"`.
macro_rules! ordering {
    ($sp:literal, $strong:expr, $weak:expr) => {
        if cfg!(reactor_weaken = $sp) {
            $weak
        } else {
            $strong
        }
    };
}

/// A full fence, left out when built with `--cfg reactor_weaken="<sp>"`.
macro_rules! full_fence {
    ($sp:literal) => {
        if !cfg!(reactor_weaken = $sp) {
            fence(Ordering::SeqCst);
        }
    };
}

/// The part of a BH (or timer, task, one-shot) node that producers touch: its flags and its
/// list link. It is the first field of every node, so a `*const Link` is also the node's address.
#[derive(Debug)]
pub(crate) struct Link {
    flags: AtomicU32,
    next: AtomicPtr<Link>,
}

impl Link {
    /// A link with `fixed` flags (`ONESHOT`, `TIMER`, `TASK`), not pending.
    pub(crate) fn new(fixed: u32) -> Link {
        Link {
            flags: AtomicU32::new(fixed),
            next: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// SP1: sets PENDING with `new` (`SCHEDULED`, `SCHEDULED | IDLE` or `DELETED`) and returns
    /// the flags before. If PENDING was clear, the caller now owns the link and must push it.
    /// An ordinary schedule upgrades a pending idle one; an idle one never downgrades a pending
    /// ordinary one.
    pub(crate) fn mark(&self, new: u32) -> u32 {
        // SP1: acquire pairs with SP8's release (the home thread read `next` before clearing
        // PENDING, so the push that may follow cannot clobber its unlink); release pairs with
        // SP8's acquire (a BH that is already queued runs after this and sees what was written
        // before it).
        let sp1 = ordering!("sp1", Ordering::AcqRel, Ordering::Relaxed);
        let old = if new & IDLE == 0 {
            self.flags.fetch_or(PENDING | new, sp1)
        } else {
            // Failure ordering: Relaxed, the loop only retries with the value read.
            let r = self.flags.fetch_update(sp1, Ordering::Relaxed, |f| {
                Some(if f & (SCHEDULED | IDLE) == SCHEDULED {
                    f | PENDING
                } else {
                    f | PENDING | new
                })
            });
            r.unwrap_or_else(|f| f)
        };
        if new & (SCHEDULED | IDLE) == SCHEDULED && old & IDLE != 0 {
            // Relaxed: the idle bit only affects progress accounting and the timeout; either
            // outcome of a race with the dequeue is correct.
            self.flags.fetch_and(!IDLE, Ordering::Relaxed);
        }
        old
    }

    /// SP8: clears PENDING, SCHEDULED and IDLE at dequeue and returns the flags before. The
    /// caller must have read the link's `next` already: after this, a producer may push it anew.
    pub(crate) fn unmark(&self) -> u32 {
        // SP8: release pairs with SP1's acquire (the read of `next` comes first); acquire
        // pairs with SP1's release (the callback sees what the scheduler wrote).
        let sp8 = ordering!("sp8", Ordering::AcqRel, Ordering::Relaxed);
        self.flags.fetch_and(!(PENDING | SCHEDULED | IDLE), sp8)
    }

    /// Clears SCHEDULED: a pending schedule will not run.
    pub(crate) fn cancel(&self) {
        // Relaxed: the dequeue's RMW (SP8) sees the bit either before or after this RMW, and
        // either outcome is a correct answer to a race between cancel and run.
        self.flags.fetch_and(!SCHEDULED, Ordering::Relaxed);
    }

    /// The flags now (a snapshot; for decisions that a later RMW confirms, or fixed bits).
    pub(crate) fn flags(&self) -> u32 {
        // Relaxed: a snapshot.
        self.flags.load(Ordering::Relaxed)
    }

    /// The link to the next node.
    ///
    /// # Safety
    /// The caller holds this link's PENDING bit (it is on the home run queue, or being pushed).
    pub(crate) unsafe fn next(&self) -> *mut Link {
        // Relaxed: written before the node was published by SP2 (pairs via SP7) or by this
        // same thread.
        self.next.load(Ordering::Relaxed)
    }

    /// Sets the link to the next node.
    ///
    /// # Safety
    /// As [`next`](Self::next).
    pub(crate) unsafe fn set_next(&self, next: *mut Link) {
        // Relaxed: published by SP2's release CAS, or read by this same thread.
        self.next.store(next, Ordering::Relaxed);
    }
}

/// The low bit of the announcement word: a notification without a node is pending. Nodes are
/// aligned to at least 8 bytes, so their addresses never have it set.
const NOTIFIED: usize = 1;

/// The sentinel head of a closed list: the reactor is gone and takes no more work.
fn closed() -> *mut Link {
    ptr::dangling_mut()
}

/// The nodes a word links to (its `NOTIFIED` bit cleared).
fn nodes(word: *mut Link) -> *mut Link {
    word.map_addr(|a| a & !NOTIFIED)
}

/// The list was closed (the reactor is gone).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Closed;

/// The lock-free list of scheduled nodes, and the announcement word that is its head:
/// producers push at the head, the home thread takes the whole list at once.
#[derive(Debug)]
pub(crate) struct List {
    head: AtomicPtr<Link>,
}

impl List {
    pub(crate) fn new() -> Self {
        List {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// SP2: pushes `link`, whose PENDING bit the caller has just set (SP1). Returns `true` if
    /// the word was zero before (nothing announced): this push owns the wakeup.
    pub(crate) fn push(&self, link: *const Link) -> Result<bool, Closed> {
        let link = link.cast_mut();
        // The first guess is an empty word, not a load of it: a load would fetch the line
        // shared and the CAS fetch it again to own it, while a spinning home thread keeps
        // reading it. Guessing right (a reactor that keeps up) costs one transfer; guessing
        // wrong returns the word.
        let mut word = ptr::null_mut();
        loop {
            let head = nodes(word);
            if head == closed() {
                return Err(Closed);
            }
            // SAFETY: the caller owns the PENDING bit of `link` and keeps it alive.
            unsafe { (*link).set_next(head) };
            // The NOTIFIED bit stays as it was: a pending notification stays pending.
            let new = link.map_addr(|a| a | (word.addr() & NOTIFIED));
            // SP2: release publishes the link and what the scheduler wrote before; pairs with
            // the acquire swap of `take` (SP7) and of `close` (SP6). Failure: Relaxed, only a
            // new guess.
            let sp2 = ordering!("sp2", Ordering::Release, Ordering::Relaxed);
            match self
                .head
                .compare_exchange_weak(word, new, sp2, Ordering::Relaxed)
            {
                Ok(_) => return Ok(word.is_null()),
                Err(w) => word = w,
            }
        }
    }

    /// SP3: announces a notification without a node. Returns `Ok(true)` if the word was zero
    /// before: this notification owns the wakeup.
    fn announce(&self) -> Result<bool, Closed> {
        // SP3: release publishes what the notifier wrote before (a stop request); pairs with
        // the acquire swap of `take` (SP7). Failure: Relaxed, the closure only retries.
        let sp3 = ordering!("sp3", Ordering::Release, Ordering::Relaxed);
        let r = self.head.fetch_update(sp3, Ordering::Relaxed, |w| {
            (nodes(w) != closed()).then(|| w.map_addr(|a| a | NOTIFIED))
        });
        match r {
            Ok(old) => Ok(old.is_null()),
            Err(_) => Err(Closed),
        }
    }

    /// SP7: takes every pushed node, newest first (linked through `next`), and consumes every
    /// announcement; returns the nodes and whether a notification without a node was pending.
    pub(crate) fn take(&self) -> (*mut Link, bool) {
        // Relaxed: only a hint that lets an empty word be left alone (the home thread does
        // not take the line from a producer for nothing). A producer's announcement it misses
        // is taken by the next take; the wait in between does not block (SP5).
        if self.head.load(Ordering::Relaxed).is_null() {
            return (ptr::null_mut(), false);
        }
        // SP7: acquire pairs with the release RMWs of SP2 in `push` and SP3 in `announce`.
        let sp7 = ordering!("sp7", Ordering::Acquire, Ordering::Relaxed);
        let w = self.head.swap(ptr::null_mut(), sp7);
        (nodes(w), w.addr() & NOTIFIED != 0)
    }

    /// SP6: closes the list; later pushes fail. Returns what was on it.
    pub(crate) fn close(&self) -> *mut Link {
        // SP6: acquire pairs with SP2: the nodes left on the list are fully published.
        let sp6 = ordering!("sp6", Ordering::Acquire, Ordering::Relaxed);
        nodes(self.head.swap(closed(), sp6))
    }

    /// Whether [`close`](Self::close) has run.
    pub(crate) fn is_closed(&self) -> bool {
        // Relaxed: a snapshot; a push re-checks in its CAS loop.
        nodes(self.head.load(Ordering::Relaxed)) == closed()
    }

    /// The nodes on the list, for an unordered peek at what is pending (a closed list peeks
    /// as empty).
    pub(crate) fn peek(&self) -> *mut Link {
        // Acquire: the nodes reached from the head must be fully published (pairs with SP2).
        let p = nodes(self.head.load(Ordering::Acquire));
        if p == closed() { ptr::null_mut() } else { p }
    }

    /// Whether anything is announced and not yet taken (a load, for busy polling and SP5).
    fn announced(&self, order: Ordering) -> bool {
        !self.head.load(order).is_null()
    }
}

/// What wakes a sleeping home thread: the eventfd (or, in the loom models, a counter).
pub(crate) trait Wake {
    fn wake(&self);
}

/// Producer-side counters, on their own cache line so that counting does not make the line of
/// the word and `notify_me` bounce more than the protocol already does. (Wakeups sent are
/// counted by the waker, which knows which doorbell it rang.)
#[derive(Debug)]
#[repr(align(64))]
struct Counters {
    skipped: AtomicU64,
}

/// The BH list with its announcement word, `notify_me`, and what wakes the home thread.
///
/// `repr(C)`: the word and `notify_me` share the first cache line, so a producer's push and
/// notification (and the home thread's take) move one line between the cores, not two.
/// Measured with the bench's `pingpong-poll`, where every bounce is such a hand-over.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Notifier<W> {
    /// The scheduled BHs; its head is the announcement word.
    pub(crate) list: List,
    /// Non-zero while the home thread may block; written only by the home thread (in steps of
    /// 2, so that nested blocking polls compose).
    notify_me: AtomicU32,
    waker: W,
    counters: Counters,
}

impl<W: Wake> Notifier<W> {
    pub(crate) fn new(waker: W) -> Self {
        Notifier {
            list: List::new(),
            notify_me: AtomicU32::new(0),
            waker,
            counters: Counters {
                skipped: AtomicU64::new(0),
            },
        }
    }

    /// What wakes the home thread.
    pub(crate) fn waker(&self) -> &W {
        &self.waker
    }

    /// SP2 then SP4: pushes `link` (whose PENDING bit the caller has just set, SP1) and wakes
    /// the home thread if this push is the first announcement since its last take and it may
    /// be asleep.
    pub(crate) fn push(&self, link: *const Link) -> Result<(), Closed> {
        let first = self.list.push(link)?;
        self.wake_if_asleep(first);
        Ok(())
    }

    /// SP3 then SP4: announces work published just before without a node (a stop request, a
    /// bare wakeup) and wakes the home thread as [`push`](Self::push) does.
    pub(crate) fn notify(&self) -> Result<(), Closed> {
        let first = self.list.announce()?;
        self.wake_if_asleep(first);
        Ok(())
    }

    /// SP4: `first` says the word was zero before this producer's RMW of it.
    fn wake_if_asleep(&self, first: bool) {
        if !first {
            // Work was already announced and not yet taken: its producer owns the wakeup,
            // and the take that consumes it collects this work too. No fence, no system call.
            // Relaxed counter: statistics only.
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // SP4: full fence between the RMW of the word and the load of `notify_me`. Pairs with
        // SP5 in `prepare_block`.
        full_fence!("sp4");
        // Relaxed: ordered by the SP4 fence.
        if self.notify_me.load(Ordering::Relaxed) != 0 {
            self.waker.wake();
        } else {
            // Relaxed counter: statistics only.
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Home step SP5: announces that the home thread may block. Returns `true` if work is
    /// already announced, in which case the wait must not block.
    pub(crate) fn prepare_block(&self) -> bool {
        // Relaxed load and store, not an RMW: only the home thread writes `notify_me`, so no
        // other write can come between them, and a locked instruction would only add to the
        // fence's cost. Ordered before the load of the word by the SP5 fence.
        let v = self.notify_me.load(Ordering::Relaxed);
        self.notify_me.store(v + 2, Ordering::Relaxed);
        // SP5: full fence between the store of `notify_me` and the load of the word. Pairs
        // with SP4 in `wake_if_asleep`: at least one side sees the other's write.
        full_fence!("sp5");
        // Relaxed: ordered by the SP5 fence.
        self.list.announced(Ordering::Relaxed)
    }

    /// Home step 3: the wait is over; producers may skip waking it again.
    pub(crate) fn finish_block(&self) {
        // Relaxed: a producer that reads the old value wakes needlessly (harmless); one that
        // reads the new value skips it, which is right because this thread is awake and checks
        // the word (SP5) before it blocks again. The store cannot become visible before the
        // wait returns: it follows it in program order and stores are not speculated. A load
        // and a store, as in `prepare_block`: the home thread is the only writer.
        let v = self.notify_me.load(Ordering::Relaxed);
        self.notify_me.store(v - 2, Ordering::Relaxed);
    }

    /// The cheap "is there work?" check for busy polling: a load, no system call.
    pub(crate) fn is_notified(&self) -> bool {
        // Relaxed: a hint; the take (SP7) provides the real ordering.
        self.list.announced(Ordering::Relaxed)
    }

    /// Notifications that skipped the wakeup (the home thread was awake, or another producer
    /// owned the wakeup) so far.
    pub(crate) fn skipped(&self) -> u64 {
        // Relaxed: statistics only.
        self.counters.skipped.load(Ordering::Relaxed)
    }
}
