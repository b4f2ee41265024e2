//! Busy polling stands down while the loop's thread waits for a CPU.
//!
//! A spin is worth its CPU only when the CPU is the loop's own: the work it waits for comes
//! from a thread running elsewhere, and waking a halted CPU would cost more than the spin.
//! When the loop shares its CPU with the very threads that give it work (a client pinned
//! next to its server, or a host with more busy threads than CPUs), every microsecond it
//! spins or preempts them is theirs. The spin's `sched_yield` (see
//! [`polling`](super::polling)) softens that, but the loop still makes more passes and
//! system calls per piece of work than one that simply waits, and the threads it shares the
//! CPU with are preempted more often.
//!
//! The kernel says how long a thread was runnable but not running: the second field of
//! `/proc/thread-self/schedstat` (`run_delay`, ns). Every [`SAMPLE_NS`], a polling loop reads
//! it once (one `pread` on a file it keeps open). While more than [`ENTER_PERMILLE`] ‰ of the
//! time since the last sample went to such waits, the loop does not busy-poll: its
//! iterations wait as with polling off, and count in
//! [`Stats::poll_contended`](crate::Stats::poll_contended). It stays down for at least
//! [`HOLD_NS`], and comes back at the first sample after that which shows under
//! [`LEAVE_PERMILLE`] ‰. The hold keeps the loop from flapping: a loop that stopped spinning
//! may get its CPU at once whenever it wakes, and so look uncontended, while its next spin
//! would take the CPU from the other thread again.
//!
//! Measured on the 2-vCPU bench VM, `nbd-server` with `qemu-img bench` (4 KiB reads, queue
//! depth 1): with both on CPU 0, the server's thread waited for the CPU 62 % of the time while
//! it polled (61k requests/s) and 22 % with polling off (69k requests/s); with the client
//! free to run on the other CPU, 0.5 % while it polled (31k requests/s) and 0.7 % without
//! polling (11k requests/s).
//!
//! The file is opened when the reactor is built with polling on (so that a sandbox installed
//! later does not matter), or else by the first sample. Where it cannot be read (no procfs, a
//! kernel without scheduler statistics), polling is never suspended.
//! [`Reactor::set_poll_stand_down`](crate::Reactor::set_poll_stand_down) turns all of this
//! off, for a loop that must spin whatever its CPU does.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// How often a polling loop samples its thread's wait for a CPU.
pub(crate) const SAMPLE_NS: u64 = 4_000_000;
/// Above this share of a sample's time (‰) spent waiting for a CPU, polling stands down.
pub(crate) const ENTER_PERMILLE: u64 = 100;
/// Under this share (‰), polling resumes.
pub(crate) const LEAVE_PERMILLE: u64 = 50;
/// How long polling stays down at least once it stood down (16 samples).
pub(crate) const HOLD_NS: u64 = 16 * SAMPLE_NS;

/// Where the thread's scheduler statistics are read from.
enum Source {
    /// Not opened yet: opened by the first sample, on the loop's thread.
    Unopened,
    Open(File),
    /// Could not be opened or read: polling is never suspended.
    Unavailable,
}

/// The loop thread's wait for a CPU, sampled.
pub(crate) struct Contention {
    source: RefCell<Source>,
    /// When the next sample is due (clock ns).
    next_sample: Cell<u64>,
    /// The last sample: its time and the thread's total `run_delay` then.
    last: Cell<Option<(u64, u64)>>,
    contended: Cell<bool>,
    /// While contended: polling stays down until this time (clock ns) at least.
    hold_until: Cell<u64>,
    /// Whether polling stands down at all (see `Reactor::set_poll_stand_down`).
    enabled: Cell<bool>,
}

impl Contention {
    /// `open_now`: open the statistics file now (the reactor is built with polling on, on
    /// its home thread).
    pub(crate) fn new(open_now: bool) -> Self {
        let c = Contention {
            source: RefCell::new(Source::Unopened),
            next_sample: Cell::new(0),
            last: Cell::new(None),
            contended: Cell::new(false),
            hold_until: Cell::new(0),
            enabled: Cell::new(true),
        };
        if open_now {
            c.open();
        }
        c
    }

    /// Turns standing down on or off; off, polling is never suspended.
    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.set(on);
        if !on {
            self.contended.set(false);
            self.last.set(None);
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.get()
    }

    /// Whether busy polling stands down at `now_ns` (the reactor's clock); samples the
    /// thread's statistics when a sample is due. Call it on the loop's thread only.
    pub(crate) fn suspends(&self, now_ns: u64) -> bool {
        if !self.enabled.get() {
            return false;
        }
        if now_ns >= self.next_sample.get() {
            self.next_sample.set(now_ns.saturating_add(SAMPLE_NS));
            match self.run_delay() {
                Some(delay) => self.observe(now_ns, delay),
                None => self.contended.set(false),
            }
        }
        self.contended.get()
    }

    /// Files a sample: at `now_ns`, the thread had waited `delay_ns` for a CPU in all.
    fn observe(&self, now_ns: u64, delay_ns: u64) {
        if let Some((then, delay_then)) = self.last.get() {
            let wall = now_ns.saturating_sub(then);
            if wall > 0 {
                let waited = delay_ns.saturating_sub(delay_then);
                let was = self.contended.get();
                let limit = if was { LEAVE_PERMILLE } else { ENTER_PERMILLE };
                let now = waited.saturating_mul(1000) > limit.saturating_mul(wall);
                if now && !was {
                    self.hold_until.set(now_ns.saturating_add(HOLD_NS));
                }
                self.contended
                    .set(now || (was && now_ns < self.hold_until.get()));
            }
        }
        self.last.set(Some((now_ns, delay_ns)));
    }

    /// Opens the statistics file, if not done yet.
    fn open(&self) {
        let mut source = self.source.borrow_mut();
        if let Source::Unopened = *source {
            // `thread-self` names the calling thread at open time: the loop's, since the
            // reactor never leaves its home thread.
            *source =
                File::open("/proc/thread-self/schedstat").map_or(Source::Unavailable, Source::Open);
        }
    }

    /// The thread's total wait for a CPU so far (ns), or `None` where it cannot be read.
    fn run_delay(&self) -> Option<u64> {
        self.open();
        let mut source = self.source.borrow_mut();
        let Source::Open(file) = &*source else {
            return None;
        };
        let mut buf = [0u8; 96];
        let delay = file
            .read_at(&mut buf, 0)
            .ok()
            .and_then(|n| parse_run_delay(&buf[..n]));
        if delay.is_none() {
            tracing::debug!(
                "reactor: /proc/thread-self/schedstat unreadable; polling never stands down"
            );
            *source = Source::Unavailable;
        }
        delay
    }
}

/// The second field of a `schedstat` line: `<run time> <run delay> <time slices>`.
fn parse_run_delay(line: &[u8]) -> Option<u64> {
    std::str::from_utf8(line)
        .ok()?
        .split_ascii_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn polling_stands_down_above_a_tenth_and_resumes_under_a_twentieth() {
        let c = Contention::new(false);
        c.observe(0, 1_000);
        assert!(!c.contended.get(), "one sample says nothing");
        c.observe(4 * MS, 1_000 + 400_000); // exactly 10 %: not above
        assert!(!c.contended.get());
        c.observe(8 * MS, 1_000 + 400_000 + 401_000);
        assert!(c.contended.get(), "10.03 % of 4 ms waiting for a CPU");
        c.observe(12 * MS, 1_000 + 801_000 + 220_000); // 5.5 %: stays down
        assert!(c.contended.get());
        c.observe(16 * MS, 1_000 + 1_021_000); // none: but within the hold
        assert!(
            c.contended.get(),
            "held down for {HOLD_NS} ns after standing down"
        );
        let delay = 1_000 + 1_021_000;
        let held = 8 * MS + HOLD_NS;
        c.observe(held, delay + 3 * MS); // after the hold, but 5.5 % over this sample
        assert!(c.contended.get());
        c.observe(held + 4 * MS, delay + 3 * MS + 200_000); // 5 %: not above the lower bound
        assert!(!c.contended.get(), "back under a twentieth");
        c.observe(held + 4 * MS, 9 * MS); // no time passed: no verdict
        assert!(!c.contended.get());
    }

    #[test]
    fn a_loop_that_may_not_stand_down_never_does() {
        let c = Contention::new(true);
        assert!(
            matches!(*c.source.borrow(), Source::Open(_)),
            "opened when built"
        );
        c.set_enabled(false);
        assert!(!c.suspends(0));
        assert!(c.last.get().is_none(), "no sample taken");
        c.set_enabled(true);
        c.observe(0, 0);
        c.observe(4 * MS, 4 * MS); // all of it waiting
        assert!(c.contended.get());
        c.set_enabled(false);
        assert!(!c.suspends(8 * MS));
    }

    #[test]
    fn samples_are_taken_once_per_period_and_this_threads_file_reads() {
        let c = Contention::new(false);
        assert!(!c.suspends(10 * MS));
        assert_eq!(c.next_sample.get(), 10 * MS + SAMPLE_NS);
        let first = c
            .last
            .get()
            .expect("schedstat is readable on Linux with procfs");
        assert!(!c.suspends(10 * MS + SAMPLE_NS - 1));
        assert_eq!(c.last.get(), Some(first), "not due yet: no sample");
        c.suspends(10 * MS + SAMPLE_NS);
        assert_ne!(c.last.get(), Some(first));
    }

    #[test]
    fn the_run_delay_is_the_second_field() {
        assert_eq!(parse_run_delay(b"2499350 12345 7\n"), Some(12345));
        assert_eq!(parse_run_delay(b"2499350\n"), None);
        assert_eq!(parse_run_delay(b"a b c"), None);
    }
}
