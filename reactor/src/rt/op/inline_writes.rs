//! Buffered writes on the loop thread, for as long as they are fast.
//!
//! ext4 and tmpfs cannot make a buffered write without blocking (they refuse `RWF_NOWAIT`
//! writes), so such writes used to go to the thread pool, each one a hand-over to a pool
//! thread and back. Yet a small buffered write normally blocks on nothing: it is a copy into
//! the page cache, a few microseconds. The hand-over cost more than the write: on the NBD
//! server's 4 KiB writes, with server and client on one CPU, 13.3 µs of server CPU per request
//! through the pool and 8.4–8.7 µs inline; at 32 requests in flight, 7.8–9.6 µs against
//! 6.0–6.5 µs, and 75–87k against 101–111k requests/s.
//!
//! What can make a buffered write wait is the state of the system, not the write: dirty-page
//! throttling, the journal, memory reclaim, or the inode's lock held by a long write on another
//! thread. So every buffered write of such a file is timed (two vDSO clock reads), on the loop
//! and on the pool alike. One that took longer than [`stall_limit`] waited, and it turns inline
//! writes off for the file; they come back once [`RECOVER`] writes in a row on the pool were
//! fast again. The loop thus waits at most once per episode of slow writes, and the pool
//! absorbs the rest of it.
//!
//! A write runs inline only when the file's owner allows it (`File::set_inline_writes`), it is
//! at most [`INLINE_MAX`] bytes, and no earlier write of the file is still on the pool (so the
//! file's writes still run in the order they were made).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::reactor::Reactor;

/// The largest write made on the loop thread: above it, the copy itself outweighs the
/// hand-over to the pool (a 256 KiB copy is tens of microseconds, a hand-over about five).
pub(crate) const INLINE_MAX: usize = 256 << 10;

/// Fast writes in a row on the pool that turn inline writes back on after a stall.
pub(crate) const RECOVER: u32 = 64;

/// How long a write of `len` bytes may take before it counts as having waited: 1 ms, plus
/// 1 ns per byte (a copy at 1 GB/s, well below what the page cache does), so that a large
/// write's own copy is never taken for a wait.
pub(crate) fn stall_limit(len: usize) -> Duration {
    Duration::from_millis(1) + Duration::from_nanos(len as u64)
}

/// One file's guard of its inline writes.
///
/// Every field is a hint: no other memory is published through them, so each access is
/// `Relaxed`, and racing updates from threads sharing the file only shift when the guard
/// turns.
#[derive(Debug)]
pub(crate) struct InlineWrites {
    /// The file's owner allows them.
    allowed: AtomicBool,
    /// No write has stalled since inline writes were last turned on.
    fast: AtomicBool,
    /// Fast writes in a row while `fast` is off.
    streak: AtomicU32,
}

impl InlineWrites {
    pub(crate) fn new() -> InlineWrites {
        InlineWrites {
            allowed: AtomicBool::new(true),
            fast: AtomicBool::new(true),
            streak: AtomicU32::new(0),
        }
    }

    pub(crate) fn set_allowed(&self, on: bool) {
        // Relaxed: a hint (see the type's doc); pairs with nothing.
        self.allowed.store(on, Ordering::Relaxed);
    }

    pub(crate) fn allowed(&self) -> bool {
        // Relaxed: as above.
        self.allowed.load(Ordering::Relaxed)
    }

    /// Whether a write of `len` bytes may run on the loop thread, as far as this guard knows
    /// (the caller also checks that the file's lane is idle).
    pub(crate) fn may_run(&self, len: usize) -> bool {
        // Relaxed: as above.
        len <= INLINE_MAX && self.allowed() && self.fast.load(Ordering::Relaxed)
    }

    /// Makes `write`, the blocking call of a write of `len` bytes, and times it. A stall on a
    /// reactor's thread (an inline write) is counted in that reactor's
    /// [`Stats::inline_write_stalls`](crate::Stats::inline_write_stalls).
    pub(crate) fn timed(
        &self,
        len: usize,
        write: impl FnOnce() -> io::Result<usize>,
    ) -> io::Result<usize> {
        let start = Instant::now();
        let res = write();
        if self.record(len, start.elapsed()) {
            Reactor::with_current(|r| r.count_inline_write_stall());
        }
        res
    }

    /// Notes a write of `len` bytes that took `took`; true if it stalled.
    pub(crate) fn record(&self, len: usize, took: Duration) -> bool {
        if took > stall_limit(len) {
            // Relaxed: as above.
            self.fast.store(false, Ordering::Relaxed);
            // Relaxed: as above.
            self.streak.store(0, Ordering::Relaxed);
            return true;
        }
        // Relaxed: as above.
        if !self.fast.load(Ordering::Relaxed)
            // Relaxed: as above.
            && self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= RECOVER
        {
            // Relaxed: as above.
            self.streak.store(0, Ordering::Relaxed);
            // Relaxed: as above.
            self.fast.store(true, Ordering::Relaxed);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_micros(5);

    #[test]
    fn a_stall_turns_inline_writes_off_until_enough_fast_writes_in_a_row() {
        let g = InlineWrites::new();
        assert!(g.may_run(4096));
        assert!(!g.record(4096, FAST));
        assert!(
            g.record(4096, Duration::from_millis(2)),
            "2 ms for 4 KiB waited"
        );
        assert!(!g.may_run(4096));
        for _ in 0..RECOVER - 1 {
            assert!(!g.record(4096, FAST));
        }
        assert!(!g.may_run(4096), "one short of the streak");
        // A stall in the streak starts it over.
        assert!(g.record(4096, Duration::from_millis(50)));
        for _ in 0..RECOVER - 1 {
            g.record(4096, FAST);
        }
        assert!(!g.may_run(4096));
        g.record(4096, FAST);
        assert!(
            g.may_run(4096),
            "back on after {RECOVER} fast writes in a row"
        );
    }

    #[test]
    fn the_limit_grows_with_the_write_and_large_writes_never_run_inline() {
        let g = InlineWrites::new();
        // 32 MiB in 20 ms is a copy, not a wait; 4 KiB in 2 ms is a wait.
        assert!(!g.record(32 << 20, Duration::from_millis(20)));
        assert!(g.may_run(INLINE_MAX));
        assert!(!g.may_run(INLINE_MAX + 1));
        assert!(stall_limit(4096) < Duration::from_millis(2));
    }

    #[test]
    fn the_owner_can_turn_them_off_and_on() {
        let g = InlineWrites::new();
        g.set_allowed(false);
        assert!(!g.may_run(4096) && !g.allowed());
        g.set_allowed(true);
        assert!(g.may_run(4096));
    }
}
