//! The reactor's notifier: the protocol of `protocol.rs`, woken by a ring message where the
//! io_uring backend can take one, else through an eventfd.
//!
//! The eventfd is registered with the fd monitor like any fd, on both backends, and the home
//! thread drains it when the monitor reports it. On io_uring (Linux 6.13 and later) a wakeup
//! is instead a completion posted straight into the reactor's ring: the same one system call
//! for the waker, and none for the woken thread (no poll wakeup to run, no eventfd to read).
//! If posting fails, the eventfd is written: the wakeup is never lost. Producers wake the
//! home thread only when it has announced that it may block (SP4/SP5), whichever the
//! doorbell.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::lockfree::event_notifier::EventNotifier;
use crate::lockfree::protocol::{self, Wake};
use crate::lockfree::sync::{AtomicU64, Ordering};

/// The notifier of a reactor.
pub(crate) type Notifier = protocol::Notifier<Bell>;

/// A wakeup other than the eventfd (the io_uring backend's ring message, provided by the fd
/// layer): `Err` when it could not be sent, and the eventfd is written instead.
pub(crate) trait MessageBell: Send + Sync + std::fmt::Debug {
    fn ring(&self) -> io::Result<()>;
}

/// How a reactor's home thread is woken.
#[derive(Debug)]
pub(crate) struct Bell {
    eventfd: EventNotifier,
    ring: Option<Box<dyn MessageBell>>,
    /// Wakeups sent as ring messages.
    messages: AtomicU64,
    /// Wakeups that wrote the eventfd.
    writes: AtomicU64,
}

impl Wake for Bell {
    fn wake(&self) {
        // The counters move before the system call that wakes the home thread, so that a
        // thread it wakes reads them up to date. Relaxed: statistics only.
        if let Some(d) = &self.ring {
            self.messages.fetch_add(1, Ordering::Relaxed);
            if d.ring().is_ok() {
                return;
            }
            self.messages.fetch_sub(1, Ordering::Relaxed);
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        // A failed write means the counter is saturated, which means it is readable: the
        // wakeup is there either way.
        let _ = self.eventfd.set();
    }
}

/// A notifier on `eventfd`, woken through `ring` when given.
pub(crate) fn new(eventfd: EventNotifier, ring: Option<Box<dyn MessageBell>>) -> Notifier {
    protocol::Notifier::new(Bell {
        eventfd,
        ring,
        messages: AtomicU64::new(0),
        writes: AtomicU64::new(0),
    })
}

impl protocol::Notifier<Bell> {
    /// Reads the eventfd until it is clear (the home thread, when the fd monitor reports it).
    pub(crate) fn drain_eventfd(&self) {
        self.waker().eventfd.test_and_clear();
    }

    /// The eventfd, for registration with the fd monitor.
    pub(crate) fn fd(&self) -> RawFd {
        self.waker().eventfd.as_raw_fd()
    }

    /// Whether wakeups go by ring message.
    pub(crate) fn rings(&self) -> bool {
        self.waker().ring.is_some()
    }

    /// `(eventfd writes, ring messages)` so far.
    pub(crate) fn wakeups(&self) -> (u64, u64) {
        let bell = self.waker();
        // Relaxed: statistics only.
        (
            bell.writes.load(Ordering::Relaxed),
            bell.messages.load(Ordering::Relaxed),
        )
    }
}
