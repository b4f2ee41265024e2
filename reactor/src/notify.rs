//! The wakeup protocol between producers (any thread) and the home thread.
//!
//! Three pieces of shared state take part: the BH list head (`bh.rs`), the flag `notified`, and
//! the counter `notify_me`, which only the home thread writes. An eventfd, registered with the fd
//! monitor like any fd, is the only thing a producer ever writes to wake a sleeping reactor, and
//! it does so only when the home thread has announced that it may sleep.
//!
//! ```text
//!  producer (schedule, wake, arm a timer)       home thread, Reactor::poll(blocking)
//!  ------------------------------------------   -------------------------------------------
//!  SP1  flags.fetch_or(PENDING|..)  AcqRel       1. timeout: 0 if BHs pending, else the timer
//!  SP2  if PENDING was clear: push   Release     SP5  notify_me += 2; fence(SeqCst);
//!  SP3  fence(SeqCst); if notified: done;            load notified -> if set, timeout = 0
//!       notified = true                          2. wait on the fd monitor
//!  SP4  fence(SeqCst); load notify_me
//!       != 0 -> write the eventfd                3. notify_me -= 2
//!                                                SP6  notified = false; fence(SeqCst);
//!                                                     take the BH list (swap, Acquire)
//!                                                SP7  per BH: flags.fetch_and(!PENDING..) AcqRel
//! ```
//!
//! Why nothing is lost:
//!
//! - **SP4 with SP5** (Dekker): each side stores (`notified` / `notify_me`), passes a full fence,
//!   then loads the other's variable. Of two SeqCst fences one comes first, so at least one side
//!   sees the other's store: either the producer sees `notify_me != 0` and writes the eventfd,
//!   or the home thread sees `notified` and does not sleep. Never both missed.
//! - **SP3 with SP6**: a notification is never consumed without the work it announces being
//!   visible. If the producer's fence comes first, the home thread's list take (after its fence)
//!   sees the push; if the home thread's fence comes first, its `notified = false` is ordered
//!   before the producer's `notified = true`, so the flag stays set and the next `poll` will not
//!   sleep. A release store alone would not do: the home thread overwrites `notified` without
//!   reading it, so no release/acquire pair would form (the "R" pattern needs full fences on both
//!   sides; QEMU's `smp_wmb` here is documented as relying on more than the C11 model gives).
//! - **SP2 with SP6's take**: the BH list itself synchronises through the release CAS of the
//!   push and the acquire swap of the take, so a taken BH's callback sees everything its
//!   scheduler wrote before scheduling.
//! - **SP1 with SP7**: the home thread unlinks a BH (reads its `next`) before clearing PENDING
//!   with release, and a producer sets PENDING with acquire before writing `next` to push it
//!   again, so the two never clobber the link. When PENDING was already set (the BH is queued
//!   but not yet run), the release half of SP1 and the acquire half of SP7 make the scheduler's
//!   writes visible to the callback.
//!
//! - **Already notified**: a producer that finds `notified` set (after its SP3 fence) stops
//!   there. The producer that set the flag owns the wakeup (its SP4/SP5 pair), and the home
//!   thread's next accept clears the flag *after* this producer's load in modification order,
//!   so by the SeqCst-fence rule that accept's SP6 fence comes after this producer's SP3 fence
//!   and its list take sees this producer's work. Under load this turns most notifications into
//!   one fence and one load, and only the first notification after each accept may write the
//!   eventfd.
//!
//! While the reactor is busy, `notify_me` is 0 and a producer makes no system call: it pays
//! at most two fences and a few atomics. The notifier's own "is there work?" check is a load of
//! `notified`, with no system call either.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::event_notifier::EventNotifier;
use crate::sync::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};

/// Producer-side counters, on their own cache line so that counting does not make the lines of
/// `notified`/`notify_me` bounce more than the protocol already does.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Counters {
    eventfd_writes: AtomicU64,
    skipped: AtomicU64,
}

/// The `notified`/`notify_me` pair and the eventfd behind it.
#[derive(Debug)]
pub(crate) struct Notifier {
    /// Set by producers after publishing work; cleared by the home thread when it accepts.
    notified: AtomicBool,
    /// Non-zero while the home thread may block; written only by the home thread (in steps of
    /// 2, so that nested blocking polls compose).
    notify_me: AtomicU32,
    eventfd: EventNotifier,
    counters: Counters,
}

impl Notifier {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Notifier {
            notified: AtomicBool::new(false),
            notify_me: AtomicU32::new(0),
            eventfd: EventNotifier::new()?,
            counters: Counters::default(),
        })
    }

    /// Producer steps SP3 and SP4: announces work published just before (by SP1/SP2 or by any
    /// other store) and writes the eventfd only if the home thread may be asleep.
    pub(crate) fn notify(&self) {
        // SP3: full fence between the publication of the work (the BH list push, the flags, a
        // timer deadline) and the accesses to `notified`. Pairs with the fence of SP6 in
        // `accept`: whichever fence is first, the home thread either sees the work or leaves
        // `notified` set for its next iteration.
        fence(Ordering::SeqCst);
        // Relaxed: ordered by the SP3 fence. If `notified` is already set, the producer that set
        // it owns the wakeup (its own SP4 check), and the home thread has not yet accepted it:
        // that accept clears the flag after this load in modification order, so by the fence
        // rule its SP6 fence follows this SP3 fence and its list take sees this work. Nothing
        // more to do: no store, no second fence, no system call.
        if self.notified.load(Ordering::Relaxed) {
            // Relaxed counter: statistics only, read by `Reactor::stats`.
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Relaxed: the fences on both sides (SP3 before, SP4 after; SP5 and SP6 at home) give
        // this store its order.
        self.notified.store(true, Ordering::Relaxed);
        // SP4: full fence between the store of `notified` and the load of `notify_me`. Pairs
        // with the fence of SP5 in `prepare_block` (store `notify_me`, fence, load `notified`).
        fence(Ordering::SeqCst);
        // Relaxed: ordered by the SP4 fence just above.
        if self.notify_me.load(Ordering::Relaxed) != 0 {
            // Relaxed counter: statistics only.
            self.counters.eventfd_writes.fetch_add(1, Ordering::Relaxed);
            // A failed write means the counter is saturated, which means it is readable:
            // the wakeup is there either way.
            let _ = self.eventfd.set();
        } else {
            // Relaxed counter: statistics only.
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Home step SP5: announces that the home thread may block. Returns `true` if a
    /// notification is already pending, in which case the wait must not block.
    pub(crate) fn prepare_block(&self) -> bool {
        // Relaxed RMW: the SP5 fence below orders it before the load of `notified`; only the
        // home thread writes `notify_me`, so the RMW cannot race with another writer.
        self.notify_me.fetch_add(2, Ordering::Relaxed);
        // SP5: full fence between the store of `notify_me` and the load of `notified`. Pairs
        // with SP4 in `notify`: at least one side sees the other's store.
        fence(Ordering::SeqCst);
        // Relaxed: ordered by the SP5 fence.
        self.notified.load(Ordering::Relaxed)
    }

    /// Home step 3: the wait is over; producers may skip the eventfd again.
    pub(crate) fn finish_block(&self) {
        // Relaxed: a producer that reads the old value writes the eventfd needlessly (harmless,
        // drained by the next iteration); one that reads the new value skips it, which is right
        // because this thread is awake and will check `notified` before it blocks again
        // (SP5). The store cannot become visible before the wait returns: it is after it in
        // program order and stores are not made visible speculatively.
        self.notify_me.fetch_sub(2, Ordering::Relaxed);
    }

    /// Home step SP6 (first half): consumes the pending notifications. The caller takes the BH
    /// list right after, with acquire (second half, in `bh.rs`).
    pub(crate) fn accept(&self) {
        // Relaxed: ordered before the list take by the SP6 fence.
        self.notified.store(false, Ordering::Relaxed);
        // SP6: full fence between clearing `notified` and reading the BH list and other
        // published work. Pairs with SP3 in `notify`.
        fence(Ordering::SeqCst);
    }

    /// The cheap "is there work?" check for busy polling: a load, no system call.
    #[allow(dead_code)] // used by adaptive polling
    pub(crate) fn is_notified(&self) -> bool {
        // Relaxed: a hint; the accept/take sequence (SP6) provides the real ordering.
        self.notified.load(Ordering::Relaxed)
    }

    /// Reads the eventfd until it is clear (the home thread, when the fd monitor reports it).
    pub(crate) fn drain_eventfd(&self) {
        self.eventfd.drain();
    }

    /// The eventfd, for registration with the fd monitor.
    pub(crate) fn fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// `(eventfd writes, notifications that skipped the eventfd)` so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        // Relaxed: statistics only.
        (
            self.counters.eventfd_writes.load(Ordering::Relaxed),
            self.counters.skipped.load(Ordering::Relaxed),
        )
    }
}
