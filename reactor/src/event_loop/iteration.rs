//! One iteration of the loop ([`Reactor::poll`], [`Reactor::try_poll`]) in its four steps:
//! the deadline, the spin (`spin.rs`), the wait on the fd monitor (announced, and what a failed
//! wait does), then completions, BHs, fd handlers and timers; and the loops built on it (`run`,
//! `run_until` and their `try_` forms).

use std::io;
use std::time::Duration;

use super::*;

/// A wait that may block, announced to the threads that would wake the loop (SP5 in
/// `lockfree/protocol.rs`: `notify_me` raised, then `notified` read), and withdrawn when this
/// guard goes, on every path out of the wait.
struct Announced<'a>(Option<&'a Notifier>);

impl<'a> Announced<'a> {
    /// Announces a wait of `timeout` unless it is zero; a notification already there makes it
    /// zero (the wait must not block).
    fn new(notifier: &'a Notifier, timeout: &mut Option<Duration>) -> Announced<'a> {
        if *timeout == Some(Duration::ZERO) {
            return Announced(None);
        }
        if notifier.prepare_block() {
            *timeout = Some(Duration::ZERO);
        }
        Announced(Some(notifier))
    }
}

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.finish_block();
        }
    }
}

/// What an iteration does with an error of the fd monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnError {
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
    /// `on_error` chooses. Four steps: the deadline, the spin, the wait, the dispatch.
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
        self.end_external_wait();
        let plan = self.spin.plan(&self.shared.clock, blocking);
        self.handlers.set_now(plan.start);
        // 1. The deadline: now for pending work, else the nearest timer (or none).
        let mut timeout = if blocking {
            self.timeout()
        } else {
            Some(Duration::ZERO)
        };
        // 2. The spin, if the plan has one and the wait would block.
        let spun = self.spin_before(&plan, &mut timeout, on_error)?;
        // 3. The wait.
        let res = self.announced_wait(&mut timeout, spun.skip_wait);
        self.spin.after_wait(&plan, spun.found, &self.shared.clock);
        let events = self.waited(res, timeout, on_error)?;
        // 4. Completions, BHs and tasks, fd handlers, timers.
        Ok(self.dispatch(events))
    }

    /// Waits on the fd monitor, unless `skip` (a spin found work and the wait can only look at
    /// fds again). A wait that may block is announced first and withdrawn after it, on every
    /// path ([`Announced`], SP5); when the announcement finds a notification, it does not block.
    fn announced_wait(&self, timeout: &mut Option<Duration>, skip: bool) -> io::Result<usize> {
        let _announced = Announced::new(&self.shared.notifier, timeout);
        if *timeout != Some(Duration::ZERO) {
            self.stats
                .blocking_waits
                .set(self.stats.blocking_waits.get() + 1);
            if self.spin.leave_poll_mode() {
                // Really about to block: only now does poll mode end.
                self.handlers.set_poll_mode(self, false);
            }
        }
        tracing::trace!(?timeout, "reactor: wait");
        if skip { Ok(0) } else { self.wait(*timeout) }
    }

    /// The outcome of the wait: its events, or after an error of the fd monitor that is
    /// survived, none (and a pause, if the wait was to block).
    fn waited(
        &self,
        res: io::Result<usize>,
        timeout: Option<Duration>,
        on_error: OnError,
    ) -> io::Result<usize> {
        match res {
            Ok(n) => {
                self.monitor_errors.succeeded();
                Ok(n)
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
                Ok(0)
            }
        }
    }

    /// Runs what is due: completions, BHs and tasks, ready fd handlers, expired timers.
    /// Returns whether that was progress.
    fn dispatch(&self, events: usize) -> bool {
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
        progress
    }

    /// The fd monitor failed with `e`: returned as is if `on_error` says so, else counted and
    /// logged (see `monitor_errors.rs`), with the pause a blocking iteration should make.
    pub(super) fn monitor_failed(&self, e: &io::Error, on_error: OnError) -> io::Result<Duration> {
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
