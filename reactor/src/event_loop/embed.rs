//! Driving the reactor from a foreign event loop: a timerfd that makes the reactor's fd readable
//! when its nearest timer is due, so that the foreign loop needs nothing but that fd.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A non-blocking `CLOCK_MONOTONIC` timerfd, armed only while a foreign loop waits.
#[derive(Debug)]
pub(crate) struct ExternalTimer {
    fd: OwnedFd,
    /// Reactor time it is armed for (`u64::MAX`: disarmed).
    armed_for: Cell<u64>,
}

impl ExternalTimer {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = crate::sys::cvt(unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        })?;
        Ok(ExternalTimer {
            // SAFETY: a fresh descriptor owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed_for: Cell::new(u64::MAX),
        })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Fires after `after` (the reactor time then is `target`), or never for `None`. No system
    /// call if it is already armed for that time.
    pub(crate) fn arm(&self, after: Option<Duration>, target: u64) {
        let target = if after.is_some() { target } else { u64::MAX };
        if self.armed_for.replace(target) == target {
            return;
        }
        let value = match after {
            // A zero it_value disarms a timerfd: arm the shortest time instead.
            Some(d) => libc::timespec {
                tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: if d.is_zero() {
                    1
                } else {
                    d.subsec_nanos() as libc::c_long
                },
            },
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: `spec` is valid for the call; the old value is not asked for.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if let Err(e) = crate::sys::cvt(rc) {
            // Not armed: forget the target so that the next call tries again. The foreign
            // loop still has the timeout `prepare_external_wait` returned.
            self.armed_for.set(u64::MAX - 1);
            tracing::warn!(error = %e, "reactor: timerfd_settime failed");
        }
    }

    /// Clears its readiness after it fired.
    pub(crate) fn drain(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64 (EAGAIN if it had not fired: fine).
        unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut v).cast(), 8) };
        self.armed_for.set(u64::MAX);
    }
}
