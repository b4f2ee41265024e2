//! One iteration of the loop ([`Reactor::poll`], [`Reactor::try_poll`]): the timeout, busy
//! polling, the wait on the fd monitor, what a failed wait does, then BHs, fd handlers and
//! timers; and the loops built on it (`run`, `run_until` and their `try_` forms).

use std::io;
use std::time::Duration;

use super::*;

/// What an iteration does with an error of the fd monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnError {
    /// Return it ([`Reactor::try_poll`]).
    Return,
    /// Count, log, pause and go on ([`Reactor::poll`]).
    Survive,
}

impl Reactor {
    /// Runs one iteration: waits (if `blocking` and nothing is pending: up to the nearest timer,
    /// or without bound) and then runs what is ready. Returns `true` if progress was made: a
    /// BH that is not idle, an fd callback or a timer ran. A wakeup by [`Handle::notify`] alone
    /// is not progress, so `poll(true)` may return `false`.
    ///
    /// `poll` may be called from inside any callback (nested); the nested call first runs what
    /// the outer call had already collected.
    ///
    /// # Errors of the fd monitor
    /// `poll` never panics on an OS error and never gives up: the monitor's own retries
    /// cover what is transient (`EINTR`, a busy io_uring), and an error that remains is
    /// counted in [`Stats::monitor_errors`], logged (at most once a second), and the
    /// iteration still runs its BHs, timers and tasks; a blocking one first pauses (1 ms,
    /// doubling to 100 ms while the failures go on) so that a broken monitor costs no CPU
    /// spin. A daemon that wants to see the error uses [`try_poll`](Self::try_poll).
    ///
    /// # Panics
    /// A panic in a callback propagates out of `poll`; the reactor stays usable and the next
    /// `poll` goes on with the work that remained. In a child process, a reactor built before
    /// the `fork()` panics (its epoll or io_uring instance is the parent's; see
    /// [`try_poll`](Self::try_poll) for the error instead).
    pub fn poll(&self, blocking: bool) -> bool {
        match self.iterate(blocking, OnError::Survive) {
            Ok(progress) => progress,
            Err(e) => unreachable!("a surviving iteration returned {e}"),
        }
    }

    /// [`poll`](Self::poll), but an error of the fd monitor that remains after its own
    /// retries is returned instead of survived: the iteration stops there, runs nothing, and
    /// leaves the reactor as it was (a later `poll` or `try_poll` goes on normally).
    ///
    /// ```
    /// let r = reactor::Reactor::new()?;
    /// r.handle().oneshot(|_| {}).unwrap();
    /// assert!(r.try_poll(true)?);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// The fd monitor's error: for example `EBADF` if its fd was closed behind the reactor's
    /// back, or `EAGAIN`/`EBUSY` from an io_uring that stayed busy through every retry. In a
    /// child process, for a reactor built before the `fork()`, an error that says so, at once
    /// and every time: the reactor's kernel objects are the parent's (the ring is also bound
    /// to the parent's thread). Build a new reactor in the child; dropping the inherited one
    /// there releases only the child's copies.
    pub fn try_poll(&self, blocking: bool) -> io::Result<bool> {
        self.iterate(blocking, OnError::Return)
    }

    /// One iteration; see [`poll`](Self::poll) and [`try_poll`](Self::try_poll) for what
    /// `on_error` chooses.
    fn iterate(&self, blocking: bool, on_error: OnError) -> io::Result<bool> {
        if self.birth.inherited() {
            // A bug of the program, not a condition to wait out: `poll` panics (see fork.rs).
            match on_error {
                OnError::Return => return Err(fork::forked()),
                OnError::Survive => panic!("{}", fork::forked()),
            }
        }
        let _enter = Enter::new(self);
        self.stats.iterations.set(self.stats.iterations.get() + 1);
        let notifier = &self.shared.notifier;
        self.end_external_wait();

        let mut adaptive = blocking && self.adaptive.enabled();
        let start = if adaptive {
            self.shared.clock.now_ns()
        } else {
            0
        };
        // The thread waits for its CPU: a spin would take it from whoever holds it.
        let contended = adaptive && self.contention.suspends(start);
        adaptive &= !contended;
        self.handlers.set_now(start);
        let mut timeout = if blocking {
            self.timeout()
        } else {
            Some(Duration::ZERO)
        };
        if contended && timeout != Some(Duration::ZERO) {
            // (Counted only where the iteration would have spun.)
            self.stats
                .poll_contended
                .set(self.stats.poll_contended.get() + 1);
        }
        let mut skip_wait = false;
        let mut polled_hit = false;
        if adaptive && timeout != Some(Duration::ZERO) && self.busy_poll(timeout, on_error)? {
            polled_hit = true;
            timeout = Some(Duration::ZERO);
            // Spinning found the work: a zero wait would only look at fds again (a system call
            // on epoll). Skip it, but not too many times in a row, so that fds without a poll
            // callback are still looked at.
            let skipped = self.skipped_waits.get();
            skip_wait = skipped < MAX_SKIPPED_WAITS && !self.monitor.borrow_mut().need_wait();
            self.skipped_waits
                .set(if skip_wait { skipped + 1 } else { 0 });
        }
        let announced = timeout != Some(Duration::ZERO);
        if announced && notifier.prepare_block() {
            timeout = Some(Duration::ZERO);
        }
        if timeout != Some(Duration::ZERO) {
            self.stats
                .blocking_waits
                .set(self.stats.blocking_waits.get() + 1);
            if self.poll_mode.replace(false) {
                // Really about to block: only now does poll mode end.
                self.handlers.set_poll_mode(self, false);
            }
        }
        tracing::trace!(?timeout, "reactor: wait");
        let res = if skip_wait { Ok(0) } else { self.wait(timeout) };
        if announced {
            notifier.finish_block();
        }
        if adaptive && !polled_hit {
            // (A hit took at most the poll time: the sweet spot, nothing to adjust, and no
            // clock read on the path to the work.)
            self.adaptive
                .adjust(self.shared.clock.now_ns().saturating_sub(start));
        }
        let events = match res {
            Ok(n) => {
                self.monitor_errors.succeeded();
                n
            }
            Err(e) => {
                let pause = self.monitor_failed(&e, on_error)?;
                // A wait that was to block pauses instead (up to its own bound); a zero
                // wait does not: work is due.
                match timeout {
                    Some(t) if t.is_zero() => {}
                    Some(t) => std::thread::sleep(pause.min(t)),
                    None => std::thread::sleep(pause),
                }
                0
            }
        };

        let bh_runs = self.stats.bh_runs.get();
        let progress = self.ops.dispatch(self)
            | self.bhs.poll(self, self.task_budget)
            | self.handlers.dispatch(self)
            | match self.timers.next_deadline() {
                Some(_) => self.timers.run(self, self.shared.clock.now_ns()),
                None => false,
            };
        tracing::trace!(
            events,
            bhs_run = self.stats.bh_runs.get() - bh_runs,
            progress,
            "reactor: iteration done"
        );
        Ok(progress)
    }

    /// The fd monitor failed with `e`: returned as is if `on_error` says so, else counted and
    /// logged (see `monitor_errors.rs`), with the pause a blocking iteration should make.
    fn monitor_failed(&self, e: &io::Error, on_error: OnError) -> io::Result<Duration> {
        let pause = self.monitor_errors.failed(e, self.backend());
        match on_error {
            OnError::Return => Err(io::Error::new(
                e.kind(),
                format!("reactor: the {} fd monitor failed: {e}", self.backend()),
            )),
            OnError::Survive => Ok(pause),
        }
    }

    /// Waits on the fd monitor and files what it reports: the notifier's eventfd is drained,
    /// fd events queued for dispatch, completions queued for their callbacks.
    pub(super) fn wait(&self, timeout: Option<Duration>) -> io::Result<usize> {
        let notifier = &self.shared.notifier;
        self.monitor.borrow_mut().wait(timeout, |ev| match ev {
            Ev::Ready {
                token: NOTIFIER_TOKEN,
                ..
            } => notifier.drain_eventfd(),
            Ev::Ready {
                token: EXTERNAL_TIMER_TOKEN,
                ..
            } => {
                if let Some(t) = self.external_timer.borrow().as_ref() {
                    t.drain();
                }
            }
            Ev::Ready { token, events } => self.handlers.ready(token, events),
            Ev::Complete {
                token,
                result,
                flags,
            } => self.ops.complete(token, result, flags),
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
        let window = self.adaptive.window(timeout);
        if window == 0 {
            return Ok(false);
        }
        if !self.poll_mode.replace(true) {
            self.handlers.set_poll_mode(self, true);
        }
        let clock = &self.shared.clock;
        let mut start = clock.now_ns();
        if self.adaptive.shared() {
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
        if self.adaptive.shared() {
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
        self.adaptive.yielded(after.saturating_sub(now));
        after
    }

    /// Changes the adaptive polling parameters (see [`PollParams`]); takes effect at the next
    /// iteration.
    pub fn set_poll(&self, params: PollParams) {
        self.adaptive.set(params);
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
        self.contention.set_enabled(on);
    }

    /// Whether busy polling stands down on a contended CPU (see
    /// [`set_poll_stand_down`](Self::set_poll_stand_down)).
    pub fn poll_stand_down(&self) -> bool {
        self.contention.enabled()
    }

    /// The adaptive polling parameters.
    pub fn poll_params(&self) -> PollParams {
        self.adaptive.params()
    }

    /// The current adaptive poll time (how long the next blocking iteration may spin).
    pub fn poll_time(&self) -> Duration {
        self.adaptive.current()
    }

    /// The wait bound of a blocking poll: zero if work is pending, else the nearest timer or
    /// the idle-BH bound, else none.
    pub(super) fn timeout(&self) -> Option<Duration> {
        // (Operations waiting for room in the ring's queue: the wait submits its backlog, and
        // must not block before they are woken to submit theirs.)
        if self.handlers.has_ready() || self.ops.has_queued() || self.ops.awaits_room() {
            return Some(Duration::ZERO);
        }
        let mut t = match self.bhs.peek(&self.shared.notifier.list) {
            Peek::Due => return Some(Duration::ZERO),
            Peek::Idle => Some(bh::IDLE_TIMEOUT),
            Peek::Nothing => None,
        };
        if let Some(deadline) = self.timers.next_deadline() {
            let left = Duration::from_nanos(deadline.saturating_sub(self.shared.clock.now_ns()));
            t = Some(t.map_or(left, |t| t.min(left)));
        }
        t
    }

    /// Polls (blocking) until [`stop`](Self::stop) or [`Handle::stop`] is called. The stop
    /// request is consumed, so `run` can be called again. Errors of the fd monitor are
    /// survived as [`poll`](Self::poll) says; [`try_run`](Self::try_run) returns them.
    pub fn run(&self) {
        // Acquire: pairs with the release store in `stop`/`Handle::stop`.
        while !self.shared.stop.swap(false, Ordering::Acquire) {
            self.poll(true);
        }
    }

    /// [`run`](Self::run) with [`try_poll`](Self::try_poll): returns the first error of the fd
    /// monitor (the stop request, if any, is left for the next `run`).
    ///
    /// ```
    /// let r = reactor::Reactor::new()?;
    /// r.handle().oneshot(|r| r.stop()).unwrap();
    /// r.try_run()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`try_poll`](Self::try_poll).
    pub fn try_run(&self) -> io::Result<()> {
        // Acquire: pairs with the release store in `stop`/`Handle::stop`.
        while !self.shared.stop.swap(false, Ordering::Acquire) {
            self.try_poll(true)?;
        }
        Ok(())
    }

    /// Polls (blocking) until `done()` returns `true`; checks it before every iteration.
    /// Errors of the fd monitor are survived as [`poll`](Self::poll) says.
    pub fn run_until(&self, mut done: impl FnMut() -> bool) {
        while !done() {
            self.poll(true);
        }
    }

    /// [`run_until`](Self::run_until) with [`try_poll`](Self::try_poll): returns the first
    /// error of the fd monitor.
    ///
    /// # Errors
    /// As [`try_poll`](Self::try_poll).
    pub fn try_run_until(&self, mut done: impl FnMut() -> bool) -> io::Result<()> {
        while !done() {
            self.try_poll(true)?;
        }
        Ok(())
    }

    /// Makes the next `count` waits of the fd monitor fail with `errno`, as if the kernel had
    /// returned it from `epoll_wait` or `io_uring_enter`: for fault tests of a daemon built on
    /// the reactor (and of the reactor itself). On io_uring, `EAGAIN` and `EBUSY` are first
    /// retried by the backend (each counts one wait), so a few of them never reach the loop.
    /// `count` 0 ends an injection.
    ///
    /// ```
    /// let r = reactor::Reactor::new()?;
    /// r.inject_monitor_errors(libc::EBADF, 1);
    /// assert!(r.try_poll(true).is_err());
    /// r.inject_monitor_errors(libc::EBADF, 1);
    /// r.handle().oneshot(|_| {}).unwrap();
    /// assert!(r.poll(true), "survived: the one-shot still ran");
    /// assert_eq!(r.stats().monitor_errors, 2);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn inject_monitor_errors(&self, errno: i32, count: u32) {
        self.monitor.borrow_mut().inject_errors(errno, count);
    }

    /// Asks [`run`](Self::run) to return after the current iteration.
    pub fn stop(&self) {
        // Release: pairs with the acquire swap in `run`.
        self.shared.stop.store(true, Ordering::Release);
    }
}
