//! Buffered writes on the loop thread, for as long as they are fast.
//!
//! ext4 and tmpfs cannot make a buffered write without blocking (they refuse `RWF_NOWAIT`
//! writes), so such writes used to go to the thread pool, each one a hand-over to a pool
//! thread and back. Yet a small buffered write of whole pages normally blocks on nothing: it
//! is a copy into the page cache, a few microseconds. The hand-over cost more than the write.
//! On the NBD server's 4 KiB writes from `qemu-img bench` (three A/B runs), server CPU per
//! request went from 13.0–13.7 µs through the pool to 8.4–9.5 µs inline with server and client
//! on one CPU, and from 7.1–7.7 to 5.8–6.3 µs at 32 requests in flight, where requests/s went
//! from 89–92k to 107–114k.
//!
//! What can still make such a write wait is the state of the system, not the write:
//! dirty-page throttling, the journal, memory reclaim, a page under writeback on a device that
//! needs stable pages, or the inode's lock held by a long write on another thread. So every
//! buffered write of such a file is timed (two vDSO clock reads), on the loop and on the pool
//! alike. One that took longer than [`stall_limit`] waited, and it turns inline writes off for
//! the file; they come back once [`RECOVER`] writes in a row were fast again, which they then
//! are on the pool. Each loop thread writing to the file thus waits at most once per episode
//! of slow writes, and the pool absorbs the rest of it. A thread preempted in the middle of a
//! write looks the same as one that waited, and is treated the same way. Measured with the
//! NBD server (`bench/scripts/dirty-stall.py`: a writer holding the page cache at a dirty
//! limit of 256 MiB, a QD1 reader on the same loop thread): the reader's worst request took
//! 17–30 ms over six runs, its p99 0.75–1.1 ms, against the kernel's 200 ms throttling pause.
//!
//! A write runs inline only when:
//! - the file's owner allows it (`File::set_inline_writes`);
//! - the file is not opened `O_SYNC`/`O_DSYNC` (each write would wait for the device);
//! - the write covers whole pages ([`whole_pages`]): a write to part of a page that is not
//!   cached reads that page from the device first;
//! - it is at most [`INLINE_MAX`] bytes;
//! - no earlier write of the file is still on the pool, so the file's writes still run in the
//!   order they were made.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::event_loop::Reactor;

/// The largest write made on the loop thread, which does nothing else while it copies: 256
/// KiB is some tens of microseconds, about as long as a loop iteration with many completions.
pub(crate) const INLINE_MAX: usize = 256 << 10;

/// Fast writes in a row that turn inline writes back on after a stall.
pub(crate) const RECOVER: u32 = 64;

/// How long a write of `len` bytes may take before it counts as having waited: 1 ms, plus
/// 1 ns per byte (a copy at 1 GB/s, well below what the page cache does), so that a large
/// write's own copy is never taken for a wait.
pub(crate) fn stall_limit(len: usize) -> Duration {
    Duration::from_millis(1) + Duration::from_nanos(len as u64)
}

/// Whether a write of `len` bytes at `offset` covers whole pages only, so that the kernel
/// need not read any page it does not hold before it copies.
pub(crate) fn whole_pages(offset: u64, len: usize) -> bool {
    static PAGE: OnceLock<u64> = OnceLock::new();
    let page = *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system; no memory is involved.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
    });
    offset % page == 0 && len as u64 % page == 0
}

/// One file's guard of its inline writes.
///
/// The fields are hints: no other memory is published through them, so each access is
/// `Relaxed`.
#[derive(Debug)]
pub(crate) struct InlineWrites {
    /// The file's owner allows them.
    allowed: AtomicBool,
    /// 0: inline writes are on. `k > 0`: a write stalled, and `k - 1` writes in a row have
    /// been fast since. One word, so that a stall racing with the end of a streak (threads
    /// sharing the file) restarts the streak instead of being lost.
    slow: AtomicU32,
}

impl InlineWrites {
    pub(crate) fn new() -> InlineWrites {
        InlineWrites {
            allowed: AtomicBool::new(true),
            slow: AtomicU32::new(0),
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
    /// (the caller checks the rest: see the module's doc).
    pub(crate) fn may_run(&self, len: usize) -> bool {
        // Relaxed: as above.
        len <= INLINE_MAX && self.allowed() && self.slow.load(Ordering::Relaxed) == 0
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
            self.slow.store(1, Ordering::Relaxed);
            return true;
        }
        // Relaxed (both orderings): as above. A failed update (inline writes on) is the
        // common case and writes nothing.
        let _ = self
            .slow
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |k| match k {
                0 => None,
                k if k >= RECOVER => Some(0),
                k => Some(k + 1),
            });
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
    fn only_writes_of_whole_pages() {
        assert!(whole_pages(0, 4096) && whole_pages(8192, 65536));
        assert!(!whole_pages(512, 4096), "an offset inside a page");
        assert!(!whole_pages(0, 512), "part of a page");
        assert!(!whole_pages(4096, 4096 + 1));
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
