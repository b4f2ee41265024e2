//! Driving the reactor from a foreign event loop: [`Reactor::prepare_external_wait`], the
//! reactor's fd ([`AsRawFd`](std::os::fd::AsRawFd)), and the stop request a foreign loop
//! checks.

use std::io;
use std::time::Duration;

use super::*;

impl Reactor {
    /// For driving the reactor from a foreign event loop: announces that the caller is about
    /// to wait on [`as_raw_fd`](std::os::fd::AsRawFd::as_raw_fd), submits what is staged, and
    /// returns how long that wait may last (`Some(ZERO)`: work is pending, do not wait;
    /// `None`: no bound). While announced, the fd becomes readable when another thread
    /// schedules work (it writes the reactor's eventfd), when a registered fd is ready, and
    /// when the nearest timer is due (a timerfd, armed here), so a foreign loop may also just
    /// wait for readability. Then call [`poll(false)`](Self::poll), which ends the
    /// announcement and runs what is ready.
    ///
    /// ```
    /// use reactor::Reactor;
    /// use std::os::fd::AsRawFd;
    ///
    /// let r = Reactor::new()?;
    /// let h = r.handle();
    /// std::thread::spawn(move || h.oneshot(|r| r.stop()).unwrap());
    /// loop {
    ///     let t = r.prepare_external_wait();
    ///     let ms = t.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    ///     let mut pfd = libc::pollfd { fd: r.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    ///     // SAFETY: one valid pollfd.
    ///     unsafe { libc::poll(&mut pfd, 1, ms) };
    ///     r.poll(false);
    ///     if r.stop_requested() {
    ///         break;
    ///     }
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn prepare_external_wait(&self) -> Option<Duration> {
        if self.birth.inherited() {
            panic!("{}", fork::forked());
        }
        self.end_external_wait();
        // The timerfd is registered first, so that on io_uring its poll goes to the kernel with
        // the rest of what is staged, just below.
        if let Err(e) = self.external_timer() {
            tracing::warn!(error = %e, "reactor: no timerfd for external waits; use the returned timeout");
        }
        if self.monitor.borrow_mut().need_wait() {
            if let Err(e) = self.wait(Some(Duration::ZERO)) {
                // Survived as `poll` does: the caller comes back after the pause (or sooner,
                // for work that is due) and the next `poll(false)` meets the monitor again.
                let pause = self.monitor_errors.failed(&e, self.backend());
                return Some(self.timeout().map_or(pause, |t| t.min(pause)));
            }
        }
        let t = self.timeout();
        if t == Some(Duration::ZERO) {
            return t;
        }
        if self.shared.notifier.prepare_block() {
            self.shared.notifier.finish_block();
            return Some(Duration::ZERO);
        }
        self.external_wait.set(true);
        // The reactor's fd becomes readable when the nearest timer is due, too.
        let target = t.map_or(u64::MAX, |d| {
            crate::sched::clock::ns_after(self.shared.clock.now_ns(), d)
        });
        if let Some(timer) = self.external_timer.borrow().as_ref() {
            timer.arm(t, target);
        }
        t
    }

    /// The timerfd of external waits, created and registered on first use.
    fn external_timer(&self) -> io::Result<std::cell::Ref<'_, ExternalTimer>> {
        if self.external_timer.borrow().is_none() {
            let timer = ExternalTimer::new()?;
            self.monitor.borrow_mut().update(
                timer.fd(),
                EXTERNAL_TIMER_TOKEN,
                0,
                libc::POLLIN as u32,
            )?;
            *self.external_timer.borrow_mut() = Some(timer);
        }
        Ok(std::cell::Ref::map(self.external_timer.borrow(), |t| {
            t.as_ref().expect("created above")
        }))
    }

    /// The timeout a blocking [`poll`](Self::poll) would wait for now (zero if work is
    /// pending, `None` if nothing bounds it), without announcing anything.
    pub fn next_timeout(&self) -> Option<Duration> {
        self.timeout()
    }

    /// Whether [`stop`](Self::stop) or [`Handle::stop`] was called since the last time
    /// [`run`](Self::run) returned or this returned `true` (the request is consumed), for loops
    /// that drive the reactor themselves.
    pub fn stop_requested(&self) -> bool {
        // Acquire: pairs with the release store in `stop`/`Handle::stop`.
        self.shared.stop.swap(false, Ordering::Acquire)
    }

    pub(super) fn end_external_wait(&self) {
        if self.external_wait.replace(false) {
            self.shared.notifier.finish_block();
        }
    }
}

impl std::os::fd::AsRawFd for Reactor {
    /// The fd a foreign loop waits on: readable while the reactor has something to report (see
    /// [`Reactor::prepare_external_wait`]). The epoll fd or the io_uring fd.
    fn as_raw_fd(&self) -> RawFd {
        self.monitor.borrow().raw_fd()
    }
}

impl std::os::fd::AsFd for Reactor {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the monitor's fd lives as long as the reactor, which outlives the borrow.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(self)) }
    }
}
