//! A busy kernel, and errors injected for tests.
//!
//! `io_uring_enter` fails with `EAGAIN` (no memory for a request right now) or `EBUSY` (the
//! completion queue overflowed and the kernel keeps no more aside) when the kernel needs the
//! caller to reap before it takes more. Reaping is the cure when there is something to reap;
//! when there is not, the call is retried after a short pause that doubles each time, and only
//! a kernel that stays busy for all of [`Backoff::TOTAL`] makes the error reach the caller.

use std::io;
use std::time::Duration;

/// Pauses between retries of a busy `io_uring_enter`: 50 µs, doubling, eight times.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    attempt: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_micros(50);
    const ATTEMPTS: u32 = 8;
    /// The longest a busy kernel is waited out before its error is returned (12.75 ms).
    #[allow(dead_code)] // documentation of the bound; checked in the tests
    pub(crate) const TOTAL: Duration = Duration::from_micros(50 * ((1 << Self::ATTEMPTS) - 1));

    /// Sleeps before the next retry; `false` once the retries are used up.
    pub(crate) fn pause(&mut self) -> bool {
        if self.attempt >= Self::ATTEMPTS {
            return false;
        }
        std::thread::sleep(Self::FIRST * (1 << self.attempt));
        self.attempt += 1;
        true
    }
}

/// Errors that the next system calls return instead of being made (see
/// [`Uring::inject_errors`](crate::Uring::inject_errors)).
#[derive(Debug, Default)]
pub(crate) struct Faults {
    errno: i32,
    left: u32,
}

impl Faults {
    pub(crate) fn set(&mut self, errno: i32, count: u32) {
        *self = Faults { errno, left: count };
    }

    /// The injected error for this call, if one is due.
    #[inline]
    pub(crate) fn take(&mut self) -> Option<io::Error> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(io::Error::from_raw_os_error(self.errno))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        let mut b = Backoff::default();
        let t0 = std::time::Instant::now();
        let mut n = 0;
        while b.pause() {
            n += 1;
        }
        assert_eq!(n, Backoff::ATTEMPTS);
        assert!(t0.elapsed() >= Backoff::TOTAL);
        assert!(!b.pause(), "stays used up");
    }

    #[test]
    fn faults_count_down() {
        let mut f = Faults::default();
        assert!(f.take().is_none());
        f.set(libc::EAGAIN, 2);
        assert_eq!(f.take().unwrap().raw_os_error(), Some(libc::EAGAIN));
        assert_eq!(f.take().unwrap().raw_os_error(), Some(libc::EAGAIN));
        assert!(f.take().is_none());
    }
}
