//! [`EventNotifier`]: an eventfd that can be set from anywhere and registered like any fd.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A level-triggered event flag backed by a non-blocking eventfd.
///
/// [`set`](Self::set) makes the fd readable (from any thread: `EventNotifier` is `Send + Sync`);
/// [`test_and_clear`](Self::test_and_clear) reports whether it was set and makes it unreadable
/// again. Register it with [`Reactor::add_fd`](crate::Reactor::add_fd) like any other fd: its
/// read callback runs while it is set, so a callback that clears it runs exactly once per set.
///
/// ```
/// use reactor::{EventNotifier, FdHandler, Reactor};
/// use std::rc::Rc;
/// use std::cell::Cell;
///
/// let r = Reactor::new()?;
/// let e = Rc::new(EventNotifier::new()?);
/// let runs = Rc::new(Cell::new(0));
/// let (e2, runs2) = (e.clone(), runs.clone());
/// r.add_fd(e.as_raw_fd(), FdHandler::new().on_read(move |_, _| {
///     assert!(e2.test_and_clear());
///     runs2.set(runs2.get() + 1);
/// }))?;
/// e.set()?;
/// e.set()?; // two sets before the reactor looks: still one event
/// while r.poll(false) {}
/// assert_eq!(runs.get(), 1);
/// # use std::os::fd::AsRawFd;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct EventNotifier {
    fd: OwnedFd,
}

impl EventNotifier {
    /// Creates a cleared notifier (`eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)`).
    ///
    /// # Errors
    /// The error of `eventfd`, for example `EMFILE`.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd =
            crate::sys::cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        Ok(EventNotifier {
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Sets the notifier: its fd becomes readable. Setting a set notifier changes nothing.
    ///
    /// # Errors
    /// Only if the write fails for a reason other than the counter being saturated (which
    /// means it is already set).
    pub fn set(&self) -> io::Result<()> {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live u64.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
            match crate::sys::cvt(n) {
                // An eventfd write is all 8 bytes or an error.
                Ok(_) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return Ok(()), // saturated: set already
                    _ => return Err(e),
                },
            }
        }
    }

    /// Clears the notifier. Returns `true` if it was set, `false` if it was already clear.
    pub fn test_and_clear(&self) -> bool {
        self.drain() > 0
    }

    /// Clears the notifier and returns how many `set`s it absorbed since the last clear.
    pub(crate) fn drain(&self) -> u64 {
        let mut v: u64 = 0;
        loop {
            // SAFETY: reads 8 bytes into a live u64.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut v).cast(), 8) };
            match crate::sys::cvt(n) {
                // An eventfd read is all 8 bytes or an error.
                Ok(_) => return v,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(_) => return 0, // EAGAIN: not set
            }
        }
    }
}

impl AsFd for EventNotifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventNotifier {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_clear() {
        let e = EventNotifier::new().unwrap();
        assert!(!e.test_and_clear());
        e.set().unwrap();
        e.set().unwrap();
        assert_eq!(e.drain(), 2);
        assert!(!e.test_and_clear());
    }
}
