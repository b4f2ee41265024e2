//! What the loop does when its fd monitor fails.
//!
//! The fd monitors retry what is transient on their own (`EINTR`; a busy io_uring, `EAGAIN` or
//! `EBUSY`, by reaping or by short pauses). An error that still comes out of a wait reaches
//! the loop, which has two answers:
//!
//! - [`Reactor::try_poll`](crate::Reactor::try_poll) and its kin return it to the caller, who
//!   decides (an embedding daemon may rebuild its reactor, or stop);
//! - [`Reactor::poll`](crate::Reactor::poll) and its kin never panic and never stop: the error is
//!   counted ([`Stats::monitor_errors`](crate::Stats::monitor_errors)), logged at most once per
//!   second with the number of repeats suppressed in between, and the iteration goes on to run
//!   its BHs, timers and tasks (only fd events are missed). A blocking iteration first pauses,
//!   1 ms doubling to 100 ms while the failures go on, so that a monitor that keeps failing
//!   costs no CPU spin; the first success resets the pause.

use std::cell::Cell;
use std::io;
use std::time::{Duration, Instant};

use crate::Backend;

/// The first pause after a failed wait.
const PAUSE_FIRST: Duration = Duration::from_millis(1);
/// The longest pause, while failures go on.
const PAUSE_MAX: Duration = Duration::from_millis(100);
/// At most one log line per this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Consecutive failures of the fd monitor, and the rate limit of their log lines.
#[derive(Debug, Default)]
pub(crate) struct MonitorErrors {
    consecutive: Cell<u32>,
    total: Cell<u64>,
    last_log: Cell<Option<Instant>>,
    suppressed: Cell<u64>,
}

impl MonitorErrors {
    /// A wait succeeded.
    #[inline]
    pub(crate) fn succeeded(&self) {
        if self.consecutive.get() != 0 {
            self.consecutive.set(0);
            tracing::info!("reactor: the fd monitor works again");
        }
    }

    /// A wait failed with `e`: counts and logs it (rate-limited) and returns how long a
    /// blocking iteration should pause.
    pub(crate) fn failed(&self, e: &io::Error, backend: Backend) -> Duration {
        let n = self.consecutive.get().saturating_add(1);
        self.consecutive.set(n);
        self.total.set(self.total.get() + 1);
        let now = Instant::now();
        match self.last_log.get() {
            Some(t) if now.duration_since(t) < LOG_INTERVAL => {
                self.suppressed.set(self.suppressed.get() + 1);
            }
            _ => {
                tracing::error!(
                    error = %e,
                    %backend,
                    consecutive = n,
                    suppressed = self.suppressed.get(),
                    "reactor: the fd monitor failed; fd events are not seen until it recovers"
                );
                self.last_log.set(Some(now));
                self.suppressed.set(0);
            }
        }
        PAUSE_FIRST
            .saturating_mul(1 << (n - 1).min(7))
            .min(PAUSE_MAX)
    }

    /// Failed waits since the reactor was created.
    pub(crate) fn total(&self) -> u64 {
        self.total.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_to_a_bound_and_reset() {
        let m = MonitorErrors::default();
        let e = io::Error::from_raw_os_error(libc::EBADF);
        let pauses: Vec<u64> = (0..10)
            .map(|_| m.failed(&e, Backend::Epoll).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 64, 100, 100, 100]);
        assert_eq!(m.total(), 10);
        // One line logged, the nine repeats within the second suppressed.
        assert_eq!(m.suppressed.get(), 9);
        m.succeeded();
        assert_eq!(m.failed(&e, Backend::Epoll), PAUSE_FIRST);
    }
}
