//! The reactor's notifier: the protocol of `protocol.rs`, woken through an eventfd.
//!
//! The eventfd is registered with the fd monitor like any fd. Producers write it only when the
//! home thread has announced that it may block (SP4/SP5); the home thread drains it when the fd
//! monitor reports it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::lockfree::event_notifier::EventNotifier;
use crate::lockfree::protocol::{self, Wake};

/// The notifier of a reactor.
pub(crate) type Notifier = protocol::Notifier<EventNotifier>;

impl Wake for EventNotifier {
    fn wake(&self) {
        // A failed write means the counter is saturated, which means it is readable: the
        // wakeup is there either way.
        let _ = self.set();
    }
}

/// A notifier with a fresh eventfd.
pub(crate) fn new() -> io::Result<Notifier> {
    Ok(protocol::Notifier::new(EventNotifier::new()?))
}

impl protocol::Notifier<EventNotifier> {
    /// Reads the eventfd until it is clear (the home thread, when the fd monitor reports it).
    pub(crate) fn drain_eventfd(&self) {
        self.waker().test_and_clear();
    }

    /// The eventfd, for registration with the fd monitor.
    pub(crate) fn fd(&self) -> RawFd {
        self.waker().as_raw_fd()
    }
}
