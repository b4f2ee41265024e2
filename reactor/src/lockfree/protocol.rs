//! The lock-free core of the reactor: the BH flags, the BH list, and the `notify_me`/`notified`
//! wakeup protocol, with every synchronisation point (SP) of it.
//!
//! This file uses atomics only through `super::sync`, and nothing else from the crate, so that
//! the loom model checker compiles this very file against its own atomics (`reactor/tests/
//! loom.rs` includes it with a `sync` module of loom types). Each SP's ordering can be weakened
//! with `--cfg reactor_weaken="spN"`, which the loom models use to show that each one matters.
//!
//! Three pieces of shared state take part: the BH list head ([`List`]), the flag `notified`, and
//! the counter `notify_me`, which only the home thread writes. An eventfd, registered with the fd
//! monitor like any fd, is the only thing a producer ever writes to wake a sleeping reactor, and
//! it does so only when the home thread has announced that it may sleep.
//!
//! ```text
//!  producer (schedule, wake, arm a timer)        home thread, Reactor::poll(blocking)
//!  -------------------------------------------   ------------------------------------------
//!  SP1  flags.fetch_or(PENDING|..)   AcqRel       1. timeout: 0 if BHs pending, else timers
//!  SP2  if PENDING was clear: push   Release      SP5  notify_me += 2; fence(SeqCst);
//!  SP3  fence(SeqCst);                                 load notified: set -> timeout = 0
//!       notified already set -> done              2. wait on the fd monitor
//!       else notified = true                      3. notify_me -= 2
//!  SP4  fence(SeqCst); load notify_me             SP6  notified = false; fence(SeqCst)
//!       != 0 -> write the eventfd                 SP7  take the list (swap)         Acquire
//!                                                 SP8  per BH: read `next`, then
//!                                                      flags.fetch_and(!PENDING..)   AcqRel
//! ```
//!
//! Why nothing is lost and nothing runs twice:
//!
//! - **SP4 with SP5** (Dekker): each side stores (`notified` / `notify_me`), passes a full fence,
//!   then loads the other's variable. Of two SeqCst fences one comes first, so at least one side
//!   sees the other's store: either the producer sees `notify_me != 0` and writes the eventfd,
//!   or the home thread sees `notified` and does not sleep. Never both missed.
//! - **SP3 with SP6**: a notification is never consumed without the work it announces being
//!   visible. If the producer's fence comes first, the home thread's take (after its fence)
//!   sees the push; if the home thread's fence comes first, its `notified = false` precedes the
//!   producer's `notified = true` in modification order, so the flag stays set and the next
//!   `poll` will not sleep. A release store alone would not do: the home thread overwrites
//!   `notified` without reading it, so no release/acquire pair forms (the "R" pattern needs full
//!   fences on both sides; QEMU's `smp_wmb` here relies on more than the C11 model gives).
//! - **Already notified**: a producer that finds `notified` set after its SP3 fence stops there.
//!   The producer that set the flag owns the wakeup (its SP4/SP5 pair), and the home thread's
//!   next accept clears the flag *after* this producer's load in modification order, so by the
//!   SeqCst-fence rule that accept's SP6 fence follows this producer's SP3 fence and its take
//!   sees this producer's work. Under load most notifications are one fence and one load.
//! - **SP2 with SP7**: the list synchronises through the release CAS of the push and the acquire
//!   swap of the take, so a taken BH's callback sees what its scheduler wrote before scheduling.
//! - **SP1 with SP8**: the home thread unlinks a BH (reads its `next`) before clearing PENDING
//!   with release, and a producer sets PENDING with acquire before writing `next` to push it
//!   again, so the two never clobber the link. When PENDING was already set (the BH is queued,
//!   not yet run), SP1's release and SP8's acquire make the scheduler's writes visible to the
//!   callback. PENDING is set and cleared by single RMWs, so a BH is queued at most once and a
//!   schedule is consumed by at most one run.
//!
//! While the reactor is busy, `notify_me` is 0 and a producer makes no system call.

use std::ptr;

use super::sync::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering, fence};

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

/// The sentinel head of a closed list: the reactor is gone and takes no more work.
fn closed() -> *mut Link {
    ptr::dangling_mut()
}

/// The list was closed (the reactor is gone).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Closed;

/// The lock-free list of scheduled nodes: producers push at the head, the home thread takes
/// the whole list at once.
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

    /// SP2: pushes `link`, whose PENDING bit the caller has just set (SP1).
    pub(crate) fn push(&self, link: *const Link) -> Result<(), Closed> {
        let link = link.cast_mut();
        // Relaxed: only a starting guess for the CAS below.
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            if head == closed() {
                return Err(Closed);
            }
            // SAFETY: the caller owns the PENDING bit of `link` and keeps it alive.
            unsafe { (*link).set_next(head) };
            // SP2: release publishes the link and what the scheduler wrote before; pairs with
            // the acquire swap of `take` (SP7). Failure: Relaxed, only a new guess.
            let sp2 = ordering!("sp2", Ordering::Release, Ordering::Relaxed);
            match self
                .head
                .compare_exchange_weak(head, link, sp2, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(h) => head = h,
            }
        }
    }

    /// SP7: takes every pushed node, newest first (linked through `next`).
    pub(crate) fn take(&self) -> *mut Link {
        // SP7: acquire pairs with the release CAS of SP2 in `push`.
        let sp7 = ordering!("sp7", Ordering::Acquire, Ordering::Relaxed);
        self.head.swap(ptr::null_mut(), sp7)
    }

    /// Closes the list; later pushes fail. Returns what was on it.
    pub(crate) fn close(&self) -> *mut Link {
        // Acquire: as in `take`, pairs with SP2.
        self.head.swap(closed(), Ordering::Acquire)
    }

    /// Whether [`close`](Self::close) has run.
    pub(crate) fn is_closed(&self) -> bool {
        // Relaxed: a snapshot; a push re-checks in its CAS loop.
        self.head.load(Ordering::Relaxed) == closed()
    }

    /// The head, for an unordered peek at what is pending (never null-checked for closure by
    /// the caller: a closed list peeks as empty).
    pub(crate) fn peek(&self) -> *mut Link {
        // Acquire: the nodes reached from the head must be fully published (pairs with SP2).
        let p = self.head.load(Ordering::Acquire);
        if p == closed() { ptr::null_mut() } else { p }
    }
}

/// What wakes a sleeping home thread: the eventfd (or, in the loom models, a counter).
pub(crate) trait Wake {
    fn wake(&self);
}

/// Producer-side counters, on their own cache line so that counting does not make the line of
/// `notified`/`notify_me` bounce more than the protocol already does. (Wakeups sent are counted
/// by the waker, which knows which doorbell it rang.)
#[derive(Debug)]
#[repr(align(64))]
struct Counters {
    skipped: AtomicU64,
}

/// The BH list, the `notified`/`notify_me` pair, and what wakes the home thread.
///
/// `repr(C)`: the list head, `notified` and `notify_me` share the first cache line, so a
/// producer's push and notification (and the home thread's accept and take) move one line
/// between the cores, not two. Measured with the bench's `pingpong-poll`, where every bounce is
/// such a hand-over.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Notifier<W> {
    /// The scheduled BHs.
    pub(crate) list: List,
    /// Set by producers after publishing work; cleared by the home thread when it accepts.
    notified: AtomicBool,
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
            notified: AtomicBool::new(false),
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

    /// Producer steps SP3 and SP4: announces work published just before (by SP1/SP2, a timer
    /// deadline, a stop request) and wakes the home thread only if it may be asleep.
    pub(crate) fn notify(&self) {
        // SP3: full fence between the publication of the work and the accesses to `notified`.
        // Pairs with SP6 in `accept`.
        full_fence!("sp3");
        // Relaxed: ordered by the SP3 fence. Already set: the producer that set it owns the
        // wakeup, and the home thread's accept that clears it will see this work (see the
        // module docs). No store, no second fence, no system call.
        if self.notified.load(Ordering::Relaxed) {
            // Relaxed counter: statistics only.
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Relaxed: the fences on both sides (SP3 before, SP4 after; SP5 and SP6 at home) give
        // this store its order.
        self.notified.store(true, Ordering::Relaxed);
        // SP4: full fence between the store of `notified` and the load of `notify_me`. Pairs
        // with SP5 in `prepare_block`.
        full_fence!("sp4");
        // Relaxed: ordered by the SP4 fence.
        if self.notify_me.load(Ordering::Relaxed) != 0 {
            self.waker.wake();
        } else {
            // Relaxed counter: statistics only.
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Home step SP5: announces that the home thread may block. Returns `true` if a
    /// notification is already pending, in which case the wait must not block.
    pub(crate) fn prepare_block(&self) -> bool {
        // Relaxed load and store, not an RMW: only the home thread writes `notify_me`, so no
        // other write can come between them, and a locked instruction would only add to the
        // fence's cost. Ordered before the load of `notified` by the SP5 fence.
        let v = self.notify_me.load(Ordering::Relaxed);
        self.notify_me.store(v + 2, Ordering::Relaxed);
        // SP5: full fence between the store of `notify_me` and the load of `notified`. Pairs
        // with SP4 in `notify`: at least one side sees the other's store.
        full_fence!("sp5");
        // Relaxed: ordered by the SP5 fence.
        self.notified.load(Ordering::Relaxed)
    }

    /// Home step 3: the wait is over; producers may skip waking it again.
    pub(crate) fn finish_block(&self) {
        // Relaxed: a producer that reads the old value wakes needlessly (harmless); one that
        // reads the new value skips it, which is right because this thread is awake and checks
        // `notified` (SP5) before it blocks again. The store cannot become visible before the
        // wait returns: it follows it in program order and stores are not speculated. A load
        // and a store, as in `prepare_block`: the home thread is the only writer.
        let v = self.notify_me.load(Ordering::Relaxed);
        self.notify_me.store(v - 2, Ordering::Relaxed);
    }

    /// Home step SP6: consumes the pending notifications. The caller then takes the list (SP7).
    pub(crate) fn accept(&self) {
        // Relaxed: ordered before the take by the SP6 fence.
        self.notified.store(false, Ordering::Relaxed);
        // SP6: full fence between clearing `notified` and reading the list and other published
        // work. Pairs with SP3 in `notify`.
        full_fence!("sp6");
    }

    /// The cheap "is there work?" check for busy polling: a load, no system call.
    #[allow(dead_code)] // used by adaptive polling and the loom models
    pub(crate) fn is_notified(&self) -> bool {
        // Relaxed: a hint; accept and take (SP6, SP7) provide the real ordering.
        self.notified.load(Ordering::Relaxed)
    }

    /// Notifications that skipped the wakeup (the home thread was awake, or another producer
    /// owned the wakeup) so far.
    pub(crate) fn skipped(&self) -> u64 {
        // Relaxed: statistics only.
        self.counters.skipped.load(Ordering::Relaxed)
    }
}
