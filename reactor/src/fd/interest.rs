//! [`Interest`]: which readiness of an fd a registration waits for.

use std::fmt;
use std::ops::BitOr;

/// The readiness an fd registration waits for: readable, writable, both, or neither (a
/// registration with no interest stays registered but is not watched).
///
/// ```
/// use reactor::Interest;
/// let both = Interest::READABLE | Interest::WRITABLE;
/// assert!(both.is_readable() && both.is_writable());
/// assert!(Interest::NONE.is_empty());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Interest(u8);

impl Interest {
    /// Not watched.
    pub const NONE: Interest = Interest(0);
    /// Readable (and error, hang-up).
    pub const READABLE: Interest = Interest(1);
    /// Writable (and error).
    pub const WRITABLE: Interest = Interest(2);

    /// Includes [`READABLE`](Self::READABLE).
    pub fn is_readable(self) -> bool {
        self.0 & 1 != 0
    }

    /// Includes [`WRITABLE`](Self::WRITABLE).
    pub fn is_writable(self) -> bool {
        self.0 & 2 != 0
    }

    /// Neither readable nor writable.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The poll(2) bits to ask the fd monitor for.
    pub(crate) fn poll_bits(self) -> u32 {
        let mut b = 0;
        if self.is_readable() {
            b |= libc::POLLIN as u32;
        }
        if self.is_writable() {
            b |= libc::POLLOUT as u32;
        }
        b
    }
}

impl BitOr for Interest {
    type Output = Interest;
    fn bitor(self, rhs: Interest) -> Interest {
        Interest(self.0 | rhs.0)
    }
}

impl fmt::Debug for Interest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.is_readable(), self.is_writable()) {
            (false, false) => f.write_str("NONE"),
            (true, false) => f.write_str("READABLE"),
            (false, true) => f.write_str("WRITABLE"),
            (true, true) => f.write_str("READABLE | WRITABLE"),
        }
    }
}

/// Events that run a read callback: readable, urgent, error, hang-up.
pub(crate) const READ_EVENTS: u32 =
    (libc::POLLIN | libc::POLLPRI | libc::POLLERR | libc::POLLHUP | libc::POLLRDHUP) as u32;
/// Events that run a write callback: writable, error.
pub(crate) const WRITE_EVENTS: u32 = (libc::POLLOUT | libc::POLLERR) as u32;
