//! Adaptive busy polling: QEMU's `poll-max-ns`, `poll-grow` and `poll-shrink`.
//!
//! Before a blocking wait, the reactor may spin for a while instead, checking without system
//! calls whether work arrived: the notifier's announcement word (a BH or task scheduled from
//! another thread), the poll callbacks of fd handlers that fired recently, and, on io_uring,
//! the completion ring. On a virtual machine a sleeping thread takes tens of microseconds to
//! wake; a spinning one sees the work in well under a microsecond.
//!
//! The spin time adapts: after each blocking poll the reactor knows how long it "blocked"
//! (spin plus wait). If that was within the current poll time, polling paid off and nothing
//! changes; if it was longer than `poll_max`, polling is pointless for this load and the time
//! shrinks; in between, a longer spin would have covered it, so the time grows.
//!
//! A spin gives its CPU away for a moment (`sched_yield`) every 2 µs, counted in
//! [`Stats::poll_yields`](crate::Stats::poll_yields). A thread that shares the CPU, often the
//! very client whose next request the spin waits for, then runs at once instead of after the
//! window; with nothing else runnable the call returns at once. Measured with `nbd-server`
//! and `qemu-img bench` pinned to one CPU, queue depth 1, 200 µs polling: 36–38k requests/s
//! without the yield, 56–60k with it (65k without polling).
//!
//! A yield that ran another thread (it took over 1.5 µs, and over 8 times the quickest yield
//! seen) shows that the loop shares its CPU.
//! The next spin then yields before it starts, so that the thread the loop has just answered
//! runs at once; and if that yield runs another thread too, the loop looks for work once and
//! waits instead of spinning ([`Stats::poll_shared`](crate::Stats::poll_shared)): on a shared
//! CPU a spin only takes time from the thread it waits for, and the wait is cheap, since the
//! thread that wakes the loop runs on the loop's own CPU. The same one-CPU measurement with
//! a 64 µs ceiling, medians of four alternating runs: reads 51.3k → 58.5k requests/s, writes
//! 53.0k → 55.0k (without polling: 63.2k and 50.3k).
//!
//! Polling without the spin still costs passes and system calls on a shared CPU. So while the
//! loop's thread waits for a CPU more than a tenth of the time, it does not poll at all (see
//! [`contention`](super::contention)).

use std::cell::Cell;
use std::time::Duration;

/// The first poll time when polling grows from zero (QEMU's 4 µs).
pub const POLL_START: Duration = Duration::from_micros(4);

/// A spin's `sched_yield` that takes longer than this, and than [`SHARED_YIELD_FACTOR`] times
/// the quickest one seen, ran another thread: with nothing else runnable the call returns in
/// about 0.2 µs on the bench VM (p99 0.3 µs). The relative bound keeps a machine where the
/// call and the clock are slow (no vDSO clock, valgrind) from seeing every yield as shared.
const SHARED_YIELD_NS: u64 = 1_500;
/// See [`SHARED_YIELD_NS`].
const SHARED_YIELD_FACTOR: u64 = 8;

/// Adaptive polling parameters, for [`Builder::poll`](crate::Builder::poll) and
/// [`Reactor::set_poll`](crate::Reactor::set_poll).
///
/// A spin gives its CPU away (`sched_yield`) every 2 µs
/// ([`Stats::poll_yields`](crate::Stats::poll_yields)), so that a thread sharing the CPU is not
/// kept waiting for the whole window; with nothing else runnable the call returns at once.
/// Once a yield has run another thread, the loop yields before it spins, and spins no
/// further while its CPU stays shared ([`Stats::poll_shared`](crate::Stats::poll_shared)).
/// And while the loop's thread spends over a tenth of its time waiting for a CPU (read every
/// 4 ms from `/proc/thread-self/schedstat`), it does not poll at all until that share drops
/// under a twentieth ([`Stats::poll_contended`](crate::Stats::poll_contended)): a spin there
/// would only take the CPU from the thread that gives the loop its work.
///
/// ```
/// use reactor::PollParams;
/// use std::time::Duration;
/// let p = PollParams { max: Duration::from_micros(32), ..PollParams::default() };
/// assert_eq!((p.grow, p.shrink), (2, 0));
/// assert!(PollParams::OFF.max.is_zero());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollParams {
    /// Longest spin before a wait; zero turns adaptive polling off.
    pub max: Duration,
    /// Factor the poll time grows by (from [`POLL_START`] when it is zero); 0 or 1 mean 2.
    pub grow: u32,
    /// Divisor the poll time shrinks by; 0 resets it to zero at once.
    pub shrink: u32,
}

impl PollParams {
    /// No busy polling (the default of a bare reactor).
    pub const OFF: PollParams = PollParams {
        max: Duration::ZERO,
        grow: 2,
        shrink: 0,
    };
    /// The default of an [`IoThread`](crate::IoThread): up to 32 µs (QEMU's default too).
    pub const IOTHREAD: PollParams = PollParams {
        max: Duration::from_micros(32),
        grow: 2,
        shrink: 0,
    };
}

impl Default for PollParams {
    fn default() -> Self {
        PollParams::OFF
    }
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The current poll time and its parameters.
#[derive(Debug)]
pub(crate) struct Adaptive {
    ns: Cell<u64>,
    max_ns: Cell<u64>,
    grow: Cell<u32>,
    shrink: Cell<u32>,
    /// The spin's last `sched_yield` ran another thread: the CPU is shared, and the next spin
    /// yields before it starts.
    shared: Cell<bool>,
    /// The quickest `sched_yield` of a spin so far, in ns.
    quickest_yield: Cell<u64>,
}

impl Adaptive {
    pub(crate) fn new(p: PollParams) -> Self {
        let a = Adaptive {
            ns: Cell::new(0),
            max_ns: Cell::new(0),
            grow: Cell::new(2),
            shrink: Cell::new(0),
            shared: Cell::new(false),
            quickest_yield: Cell::new(u64::MAX),
        };
        a.set(p);
        a
    }

    pub(crate) fn set(&self, p: PollParams) {
        self.max_ns.set(ns(p.max));
        self.grow.set(if p.grow < 2 { 2 } else { p.grow });
        self.shrink.set(p.shrink);
        self.ns.set(self.ns.get().min(self.max_ns.get()));
        self.shared.set(false);
    }

    pub(crate) fn params(&self) -> PollParams {
        PollParams {
            max: Duration::from_nanos(self.max_ns.get()),
            grow: self.grow.get(),
            shrink: self.shrink.get(),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.max_ns.get() > 0
    }

    /// The current poll time.
    pub(crate) fn current(&self) -> Duration {
        Duration::from_nanos(self.ns.get())
    }

    /// How long to spin before a wait of `timeout` (`None`: unbounded).
    pub(crate) fn window(&self, timeout: Option<Duration>) -> u64 {
        let w = self.ns.get();
        timeout.map_or(w, |t| w.min(ns(t)))
    }

    /// Whether the last yield of a spin gave the CPU to another thread.
    pub(crate) fn shared(&self) -> bool {
        self.shared.get()
    }

    /// Records how long a spin's `sched_yield` took: longer than [`SHARED_YIELD_NS`], and than
    /// [`SHARED_YIELD_FACTOR`] times the quickest so far, means another thread ran meanwhile.
    pub(crate) fn yielded(&self, took_ns: u64) {
        let quickest = self.quickest_yield.get().min(took_ns);
        self.quickest_yield.set(quickest);
        let bound = SHARED_YIELD_NS.max(quickest.saturating_mul(SHARED_YIELD_FACTOR));
        self.shared.set(took_ns > bound);
    }

    /// Adapts the poll time to a blocking poll that took `block_ns` (spin plus wait).
    pub(crate) fn adjust(&self, block_ns: u64) {
        let (cur, max) = (self.ns.get(), self.max_ns.get());
        if max == 0 {
            self.ns.set(0);
        } else if block_ns <= cur {
            // The sweet spot: polling covered the wait.
        } else if block_ns > max {
            // Polling as long as this would cost too much: poll less.
            let s = self.shrink.get();
            self.ns.set(if s == 0 { 0 } else { cur / u64::from(s) });
        } else if cur < max {
            // A longer spin would have covered this wait: poll longer.
            let next = if cur == 0 {
                ns(POLL_START)
            } else {
                cur.saturating_mul(u64::from(self.grow.get()))
            };
            self.ns.set(next.min(max));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> u64 {
        n * 1000
    }

    #[test]
    fn grows_from_zero_shrinks_when_waits_are_long_and_holds_in_the_sweet_spot() {
        let a = Adaptive::new(PollParams {
            max: Duration::from_micros(32),
            grow: 2,
            shrink: 0,
        });
        assert_eq!(a.current(), Duration::ZERO);
        a.adjust(us(10)); // a short wait: polling would have covered it
        assert_eq!(a.current(), POLL_START);
        a.adjust(us(10));
        assert_eq!(a.current(), Duration::from_micros(8));
        a.adjust(us(10));
        assert_eq!(a.current(), Duration::from_micros(16));
        a.adjust(us(10)); // within the poll time: no change
        assert_eq!(a.current(), Duration::from_micros(16));
        a.adjust(us(30));
        assert_eq!(a.current(), Duration::from_micros(32), "capped at max");
        a.adjust(us(31));
        assert_eq!(a.current(), Duration::from_micros(32));
        a.adjust(us(1000)); // far beyond max: reset (shrink 0)
        assert_eq!(a.current(), Duration::ZERO);
    }

    #[test]
    fn a_yield_counts_as_shared_when_it_is_slow_for_this_machine() {
        let a = Adaptive::new(PollParams::IOTHREAD);
        assert!(!a.shared());
        a.yielded(200);
        assert!(!a.shared());
        a.yielded(1_400);
        assert!(!a.shared(), "under the absolute bound");
        a.yielded(5_000);
        assert!(a.shared(), "another thread ran");
        a.yielded(250);
        assert!(!a.shared(), "it cleared with the next quick yield");
        a.yielded(5_000);
        a.set(PollParams::IOTHREAD);
        assert!(!a.shared(), "new parameters start afresh");
        // A machine whose quickest yield takes 2 µs (valgrind, no vDSO clock): 8 times that.
        let slow = Adaptive::new(PollParams::IOTHREAD);
        slow.yielded(2_000);
        slow.yielded(10_000);
        assert!(!slow.shared());
        slow.yielded(17_000);
        assert!(slow.shared());
    }

    #[test]
    fn shrink_divides_and_max_zero_turns_it_off() {
        let a = Adaptive::new(PollParams {
            max: Duration::from_micros(64),
            grow: 4,
            shrink: 2,
        });
        for _ in 0..5 {
            a.adjust(us(50));
        }
        assert_eq!(a.current(), Duration::from_micros(64));
        a.adjust(us(100));
        assert_eq!(a.current(), Duration::from_micros(32));
        a.set(PollParams::OFF);
        assert!(!a.enabled());
        assert_eq!(a.current(), Duration::ZERO);
        a.adjust(us(1));
        assert_eq!(a.current(), Duration::ZERO);
        assert_eq!(a.window(None), 0);
    }

    #[test]
    fn the_window_never_exceeds_the_timeout() {
        let a = Adaptive::new(PollParams {
            max: Duration::from_micros(100),
            grow: 2,
            shrink: 0,
        });
        for _ in 0..6 {
            a.adjust(us(90));
        }
        assert_eq!(a.window(None), us(100));
        assert_eq!(a.window(Some(Duration::from_micros(7))), us(7));
    }
}
