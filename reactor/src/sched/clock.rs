//! The reactor's monotonic clock: deadlines are nanoseconds since the reactor was created.

use std::time::{Duration, Instant};

/// The deadline of a timer that is not armed: a time no clock reaches.
pub(crate) const DISARMED: u64 = u64::MAX;

/// Nanoseconds since the reactor's clock base, saturating below [`DISARMED`].
pub(crate) fn ns_after(now: u64, d: Duration) -> u64 {
    let d = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    now.saturating_add(d).min(DISARMED - 1)
}

/// The reactor's monotonic clock: nanoseconds since its creation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    base: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock {
            base: Instant::now(),
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(DISARMED - 1)
    }

    /// `when` in reactor nanoseconds (0 if it is before the clock's base).
    pub(crate) fn ns_of(&self, when: Instant) -> u64 {
        let d = when.saturating_duration_since(self.base);
        ns_after(0, d)
    }
}
