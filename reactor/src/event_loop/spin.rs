//! The spin of an iteration: whether it busy-polls before its wait, for how long, and what it
//! learns from that (the adaptive poll time, a CPU shared or contended, the waits it skips).
//! Every decision of busy polling is made here; `polling.rs` holds the parameters and the poll
//! time's arithmetic, `contention.rs` the measurement of the thread's wait for a CPU, and
//! `fd/handlers.rs` the handlers' side of poll mode.

use std::cell::Cell;
use std::io;
use std::time::Duration;

use super::contention::Contention;
use super::iteration::OnError;
use super::polling::{Adaptive, PollParams};
use super::*;
use crate::sched::clock::Clock;

/// Most consecutive iterations that skip the fd monitor because busy polling found work.
const MAX_SKIPPED_WAITS: u32 = 8;

/// How long busy polling spins between two `sched_yield` calls (see [`PollParams`]). A thread
/// that shares the spinner's CPU waits at most about this long for it; and a hand-over
/// between two spinning threads (well under a microsecond) never reaches a call.
const POLL_YIELD_NS: u64 = 2_000;

/// A reactor's busy polling: its state, and the decisions made from it.
pub(crate) struct Spin {
    /// The poll time and its parameters; whether the last yield ran another thread.
    adaptive: Adaptive,
    /// The loop thread's wait for a CPU, which makes busy polling stand down.
    contention: Contention,
    /// Busy polling has started and the loop has not blocked since.
    poll_mode: Cell<bool>,
    /// Consecutive iterations whose wait was skipped because spinning found work.
    skipped_waits: Cell<u32>,
}

/// What an iteration will do about spinning, decided at its start.
pub(crate) struct Plan {
    /// When the iteration started, if it may spin (else 0): what its block time is counted
    /// from.
    pub(crate) start: u64,
    /// It spins before a wait that would block.
    spin: bool,
    /// It would have spun, but the thread waits for its CPU: it stands down.
    contended: bool,
}

/// What the spin of an iteration found.
#[derive(Default)]
pub(crate) struct Spun {
    /// Work, before the wait.
    pub(crate) found: bool,
    /// The wait can be skipped (it could only look at fds again).
    pub(crate) skip_wait: bool,
}

impl Spin {
    /// Polling with `params`, standing down on a contended CPU if `stand_down` (whose
    /// measurement is opened now if polling is on, so that a sandbox installed later does not
    /// matter).
    pub(crate) fn new(params: PollParams, stand_down: bool) -> Spin {
        let s = Spin {
            adaptive: Adaptive::new(params),
            contention: Contention::new(stand_down && !params.max.is_zero()),
            poll_mode: Cell::new(false),
            skipped_waits: Cell::new(0),
        };
        s.contention.set_enabled(stand_down);
        s
    }

    /// The plan of an iteration (`blocking` or not), at its start.
    pub(crate) fn plan(&self, clock: &Clock, blocking: bool) -> Plan {
        let enabled = blocking && self.adaptive.enabled();
        let start = if enabled { clock.now_ns() } else { 0 };
        // The thread waits for its CPU: a spin would take it from whoever holds it.
        let contended = enabled && self.contention.suspends(start);
        Plan {
            start,
            spin: enabled && !contended,
            contended,
        }
    }

    /// Spinning found work: whether the iteration skips its (zero) wait, which could only
    /// look at fds again (a system call on epoll); not too many times in a row, so that fds
    /// without a poll callback are still looked at. `no_wait_needed` is asked only if it may.
    fn skip_wait(&self, no_wait_needed: impl FnOnce() -> bool) -> bool {
        let skipped = self.skipped_waits.get();
        let skip = skipped < MAX_SKIPPED_WAITS && no_wait_needed();
        self.skipped_waits.set(if skip { skipped + 1 } else { 0 });
        skip
    }

    /// Poll mode begins (a spin starts); `true` if it was not on.
    fn enter_poll_mode(&self) -> bool {
        !self.poll_mode.replace(true)
    }

    /// The loop is about to block: poll mode ends; `true` if it was on.
    pub(crate) fn leave_poll_mode(&self) -> bool {
        self.poll_mode.replace(false)
    }

    /// After the wait of an iteration that planned to spin and found nothing by spinning:
    /// the poll time adapts to how long it blocked (a hit took at most the poll time: the
    /// sweet spot, nothing to adjust, and no clock read on the path to the work).
    pub(crate) fn after_wait(&self, plan: &Plan, found: bool, clock: &Clock) {
        if plan.spin && !found {
            self.adaptive
                .adjust(clock.now_ns().saturating_sub(plan.start));
        }
    }
}

impl Reactor {
    /// Step 2 of an iteration: the spin its plan calls for before a wait of `timeout` that
    /// would block; work found makes the wait zero (`timeout`), and maybe skipped.
    pub(super) fn spin_before(
        &self,
        plan: &Plan,
        timeout: &mut Option<Duration>,
        on_error: OnError,
    ) -> io::Result<Spun> {
        if *timeout == Some(Duration::ZERO) {
            return Ok(Spun::default());
        }
        if plan.contended {
            // (Counted only where the iteration would have spun.)
            self.stats
                .poll_contended
                .set(self.stats.poll_contended.get() + 1);
        }
        if !plan.spin || !self.busy_poll(*timeout, on_error)? {
            return Ok(Spun::default());
        }
        *timeout = Some(Duration::ZERO);
        let skip_wait = self
            .spin
            .skip_wait(|| !self.monitor.borrow_mut().need_wait());
        Ok(Spun {
            found: true,
            skip_wait,
        })
    }

    /// Adaptive polling: spins for up to the current poll time (and at most `timeout`),
    /// checking for work without system calls (but a `sched_yield` every 2 µs, and on epoll
    /// a zero wait every 64 spins). Returns `true` if some was found.
    /// A failed zero wait ends the spin: the blocking wait that follows meets the error again
    /// and handles it.
    fn busy_poll(&self, timeout: Option<Duration>, on_error: OnError) -> io::Result<bool> {
        // Staged changes (re-arms after events) go to the kernel first, so that what they
        // watch can be seen while spinning; a zero wait also collects what is already there.
        if self.monitor.borrow_mut().need_wait() {
            match self.wait(Some(Duration::ZERO)) {
                Ok(n) if n > 0 => return Ok(true),
                Ok(_) => {}
                Err(e) => {
                    self.monitor_failed(&e, on_error)?;
                    return Ok(false);
                }
            }
        }
        let window = self.spin.adaptive.window(timeout);
        if window == 0 {
            return Ok(false);
        }
        if self.spin.enter_poll_mode() {
            self.handlers.set_poll_mode(self, true);
        }
        let clock = &self.shared.clock;
        let mut start = clock.now_ns();
        if self.spin.adaptive.shared() {
            // The last yield ran another thread on this CPU: most likely the peer this loop
            // has just answered (a client woken by the reply), whose next request the spin
            // would wait for. After one look for work already there, it runs first, rather
            // than after 2 µs of spinning.
            if self.poll_found() {
                return Ok(true);
            }
            start = self.poll_yield(start);
        }
        // Still shared: the CPU's other thread ran again. Spinning on would take the CPU from
        // it, and a wait here is cheap (whoever wakes this thread runs on its CPU, which is
        // not halted): one more look, then the wait.
        if self.spin.adaptive.shared() {
            self.stats.poll_shared.set(self.stats.poll_shared.get() + 1);
            return Ok(self.poll_found());
        }
        let deadline = start.saturating_add(window);
        let mut next_yield = start.saturating_add(POLL_YIELD_NS);
        let mut spins = 0u32;
        let syscall_poll = self.monitor.borrow().needs_syscall_to_poll();
        loop {
            if self.poll_found() {
                return Ok(true);
            }
            spins = spins.wrapping_add(1);
            // On epoll, fds can only be seen with a system call: one zero wait every 64 spins
            // (about a microsecond), which the spinning pays for anyway.
            if spins % 64 == 0 && syscall_poll {
                match self.wait(Some(Duration::ZERO)) {
                    Ok(n) if n > 0 => {
                        self.stats.poll_hits.set(self.stats.poll_hits.get() + 1);
                        return Ok(true);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.monitor_failed(&e, on_error)?;
                        return Ok(false);
                    }
                }
            }
            // The clock (a vDSO call) is read every 16 spins only.
            if spins % 16 == 0 {
                let now = clock.now_ns();
                if now >= deadline {
                    self.stats.poll_misses.set(self.stats.poll_misses.get() + 1);
                    return Ok(false);
                }
                if now >= next_yield {
                    // A thread that shares this CPU (often the very client whose next request
                    // the spin waits for) gets it now rather than when the window ends.
                    // With nothing else runnable this returns at once.
                    next_yield = self.poll_yield(now).saturating_add(POLL_YIELD_NS);
                }
            }
            std::hint::spin_loop();
        }
    }

    /// One look of a spin for work, counted as a hit when it finds some.
    fn poll_found(&self) -> bool {
        // The notifier's own poll check: a load of the announcement word, no system call.
        let found = self.shared.notifier.is_notified()
            || self.handlers.poll_recent(self)
            || self.monitor.borrow_mut().has_events_hint();
        if found {
            self.stats.poll_hits.set(self.stats.poll_hits.get() + 1);
        }
        found
    }

    /// A spin's `sched_yield` at `now`; notes whether another thread ran meanwhile. Returns
    /// the time after it.
    fn poll_yield(&self, now: u64) -> u64 {
        // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
        unsafe { libc::sched_yield() };
        self.stats.poll_yields.set(self.stats.poll_yields.get() + 1);
        let after = self.shared.clock.now_ns();
        self.spin.adaptive.yielded(after.saturating_sub(now));
        after
    }

    /// Changes the adaptive polling parameters (see [`PollParams`]); takes effect at the next
    /// iteration.
    pub fn set_poll(&self, params: PollParams) {
        self.spin.adaptive.set(params);
    }

    /// Whether busy polling stands down while this loop's thread waits for a CPU more than a
    /// tenth of the time (on by default; see [`PollParams`] and
    /// [`Stats::poll_contended`](crate::Stats::poll_contended)). Off, the loop spins whatever
    /// its CPU does: for a thread that owns its CPU and must never miss a spin, or a test of
    /// the spin itself.
    ///
    /// ```
    /// let r = reactor::Reactor::new()?;
    /// assert!(r.poll_stand_down());
    /// r.set_poll_stand_down(false);
    /// assert!(!r.poll_stand_down());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_poll_stand_down(&self, on: bool) {
        self.spin.contention.set_enabled(on);
    }

    /// Whether busy polling stands down on a contended CPU (see
    /// [`set_poll_stand_down`](Self::set_poll_stand_down)).
    pub fn poll_stand_down(&self) -> bool {
        self.spin.contention.enabled()
    }

    /// The adaptive polling parameters.
    pub fn poll_params(&self) -> PollParams {
        self.spin.adaptive.params()
    }

    /// The current adaptive poll time (how long the next blocking iteration may spin).
    pub fn poll_time(&self) -> Duration {
        self.spin.adaptive.current()
    }
}
