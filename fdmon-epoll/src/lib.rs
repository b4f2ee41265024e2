//! A thin, level-triggered epoll fd monitor.
//!
//! This crate knows nothing of bottom halves, tasks or timers. Its currency is plain data: a raw
//! fd, a caller-chosen `u64` token, and poll(2) event bits ([`POLLIN`], [`POLLOUT`], ...), which
//! have the same values as epoll's `EPOLL*` bits. The surface is the one every reactor fd monitor
//! shares:
//!
//! - [`Epoll::update`]`(fd, token, old, new)` moves a registration from interest `old` to `new`;
//!   it maps to `EPOLL_CTL_ADD` (old empty), `EPOLL_CTL_MOD` (both set) or `EPOLL_CTL_DEL` (new
//!   empty), so the kernel's own errors (`EEXIST`, `ENOENT`, `EBADF`, `EPERM` for regular files)
//!   reach the caller unchanged.
//! - [`Epoll::wait`] waits with a nanosecond timeout (`epoll_pwait2`, or `epoll_wait` with the
//!   timeout rounded *up* to whole milliseconds on kernels older than 5.11), retries on `EINTR`
//!   with the remaining time, and hands each ready registration to a callback.
//! - [`Epoll::need_wait`] is always `false`: epoll keeps no queued work of its own.
//!
//! Registrations are level-triggered: a readable fd is reported by every `wait` until it is
//! drained. The epoll fd is created with `EPOLL_CLOEXEC`.
//!
//! ```
//! use fdmon_epoll::{Epoll, POLLIN};
//! use std::os::fd::AsRawFd;
//! use std::time::Duration;
//!
//! let mut ep = Epoll::new()?;
//! let (a, b) = std::os::unix::net::UnixStream::pair()?;
//! ep.update(a.as_raw_fd(), 7, 0, POLLIN)?;
//! std::io::Write::write_all(&mut &b, b"x")?;
//! let mut seen = Vec::new();
//! ep.wait(Some(Duration::from_secs(1)), |ev| seen.push((ev.token, ev.events)))?;
//! assert_eq!(seen, vec![(7, POLLIN)]);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Readable (`EPOLLIN`).
pub const POLLIN: u32 = libc::POLLIN as u32;
/// Urgent data (`EPOLLPRI`).
pub const POLLPRI: u32 = libc::POLLPRI as u32;
/// Writable (`EPOLLOUT`).
pub const POLLOUT: u32 = libc::POLLOUT as u32;
/// Error condition; always reported, never needs to be asked for (`EPOLLERR`).
pub const POLLERR: u32 = libc::POLLERR as u32;
/// Hang-up; always reported, never needs to be asked for (`EPOLLHUP`).
pub const POLLHUP: u32 = libc::POLLHUP as u32;
/// Peer closed its writing half (`EPOLLRDHUP`).
pub const POLLRDHUP: u32 = libc::POLLRDHUP as u32;

/// The interest bits a caller may ask for. `POLLERR` and `POLLHUP` are accepted and ignored,
/// because the kernel always reports them.
pub const INTEREST_MASK: u32 = POLLIN | POLLPRI | POLLOUT | POLLRDHUP | POLLERR | POLLHUP;

const _: () = {
    // The module promise: poll(2) bits and epoll bits are the same numbers.
    assert!(POLLIN == libc::EPOLLIN as u32);
    assert!(POLLPRI == libc::EPOLLPRI as u32);
    assert!(POLLOUT == libc::EPOLLOUT as u32);
    assert!(POLLERR == libc::EPOLLERR as u32);
    assert!(POLLHUP == libc::EPOLLHUP as u32);
    assert!(POLLRDHUP == libc::EPOLLRDHUP as u32);
};

/// One ready registration reported by [`Epoll::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The token given to [`Epoll::update`].
    pub token: u64,
    /// The poll(2) bits that are ready, `POLLERR`/`POLLHUP` included.
    pub events: u32,
}

/// A level-triggered epoll instance.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
    buf: Vec<libc::epoll_event>,
    /// `false` once `epoll_pwait2` returned `ENOSYS`; then `epoll_wait` is used.
    has_pwait2: bool,
    /// Errors injected by [`inject_errors`](Epoll::inject_errors): (errno, calls left).
    faults: (i32, u32),
}

/// The largest event buffer [`Epoll::wait`] grows to; further ready fds wait for the next call.
const MAX_BUF: usize = 4096;

impl Epoll {
    /// Creates an epoll instance (`epoll_create1(EPOLL_CLOEXEC)`).
    ///
    /// # Errors
    /// The error of `epoll_create1`, for example `EMFILE` when the process is out of fds.
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll {
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            faults: (0, 0),
            buf: Vec::with_capacity(64),
            has_pwait2: true,
        })
    }

    /// Moves the registration of `fd` from interest `old` to interest `new` (poll(2) bits).
    ///
    /// `old == 0` adds `fd` with `token`, `new == 0` removes it, and anything else modifies the
    /// interest (and token). `old == new == 0` does nothing.
    ///
    /// # Errors
    /// `EINVAL` for bits outside [`INTEREST_MASK`]; otherwise the error of `epoll_ctl`: `EBADF`
    /// for an invalid fd, `EEXIST` when adding an fd that is already registered, `ENOENT` when
    /// modifying or removing one that is not, `EPERM` for fds epoll cannot watch (regular files,
    /// directories).
    pub fn update(&mut self, fd: RawFd, token: u64, old: u32, new: u32) -> io::Result<()> {
        if (old | new) & !INTEREST_MASK != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fdmon-epoll: unknown event bits {:#x}",
                    (old | new) & !INTEREST_MASK
                ),
            ));
        }
        let op = match (old != 0, new != 0) {
            (false, false) => return Ok(()),
            (false, true) => libc::EPOLL_CTL_ADD,
            (true, true) => libc::EPOLL_CTL_MOD,
            (true, false) => libc::EPOLL_CTL_DEL,
        };
        let mut ev = libc::epoll_event {
            events: new & !(POLLERR | POLLHUP),
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; the kernel copies it.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until a registration is ready or `timeout` passes, and calls `on_event` for each
    /// ready registration. `None` waits without a bound; `Some(Duration::ZERO)` only checks.
    ///
    /// Returns the number of events delivered (0 on timeout). An `EINTR` is retried with the
    /// time that remains, so a signal never shortens the wait into a false "nothing happened"
    /// with time left; it may be delivered early as 0 events only once the timeout has passed.
    ///
    /// # Errors
    /// The error of `epoll_pwait2`/`epoll_wait` other than `EINTR` (for example `EBADF` if the
    /// epoll fd were closed behind this object's back).
    pub fn wait(
        &mut self,
        timeout: Option<Duration>,
        mut on_event: impl FnMut(Event),
    ) -> io::Result<usize> {
        let deadline = match timeout {
            Some(t) if !t.is_zero() => Instant::now().checked_add(t),
            _ => None,
        };
        let mut remaining = timeout;
        let n = loop {
            match self.wait_once(remaining) {
                Ok(n) => break n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    // Retry with what is left of the caller's timeout.
                    if let (Some(_), Some(dl)) = (remaining, deadline) {
                        remaining = Some(dl.saturating_duration_since(Instant::now()));
                    }
                }
                Err(e) => return Err(e),
            }
        };
        for ev in &self.buf[..n] {
            on_event(Event {
                token: ev.u64,
                events: ev.events,
            });
        }
        if n == self.buf.capacity() && n < MAX_BUF {
            // Every slot was used: more fds may be ready. Grow for the next call (rare).
            self.buf.reserve(n);
        }
        Ok(n)
    }

    /// Makes the next `count` `epoll_pwait2`/`epoll_wait` calls made by [`wait`](Self::wait)
    /// fail with `errno` without reaching the kernel, as if the kernel had returned it: for
    /// testing how a caller lives with a failing kernel. `count` 0 ends an injection.
    ///
    /// ```
    /// # use fdmon_epoll::Epoll;
    /// let mut ep = Epoll::new()?;
    /// ep.inject_errors(libc::ENOMEM, 1);
    /// let e = ep.wait(None, |_| {}).unwrap_err();
    /// assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));
    /// assert_eq!(ep.wait(Some(std::time::Duration::ZERO), |_| {})?, 0);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn inject_errors(&mut self, errno: i32, count: u32) {
        self.faults = (errno, count);
    }

    /// One `epoll_pwait2` (or `epoll_wait`) call; returns the number of filled events.
    fn wait_once(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        if self.faults.1 > 0 {
            self.faults.1 -= 1;
            return Err(io::Error::from_raw_os_error(self.faults.0));
        }
        let cap = self.buf.capacity().min(MAX_BUF) as libc::c_int;
        let epfd = self.fd.as_raw_fd();
        let out = self.buf.as_mut_ptr();
        let rc = if self.has_pwait2 {
            let ts = timeout.map(|t| libc::timespec {
                tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
                tv_nsec: t.subsec_nanos() as libc::c_long,
            });
            let ts_ptr = ts
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: `out` has room for `cap` events; `ts_ptr` is null or points to a live
            // timespec; a null sigmask means "do not change the mask".
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    epfd,
                    out,
                    cap,
                    ts_ptr,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                self.has_pwait2 = false;
                return self.wait_once(timeout);
            }
            rc as libc::c_int
        } else {
            // SAFETY: `out` has room for `cap` events.
            unsafe { libc::epoll_wait(epfd, out, cap, timeout_ms_round_up(timeout)) }
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = rc as usize;
        // SAFETY: the kernel initialised the first `n <= cap` entries.
        unsafe { self.buf.set_len(n) };
        Ok(n)
    }

    /// Always `false`: epoll queues nothing that needs a `wait` to be handed to the kernel.
    pub fn need_wait(&self) -> bool {
        false
    }

    /// Whether `epoll_pwait2` is used (kernel 5.11 and later); `false` after a fallback.
    pub fn has_nanosecond_timeouts(&self) -> bool {
        self.has_pwait2
    }

    /// Forces the `epoll_wait` fallback, as on kernels without `epoll_pwait2`. For tests.
    #[doc(hidden)]
    pub fn force_millisecond_timeouts(&mut self) {
        self.has_pwait2 = false;
    }
}

/// The `epoll_wait` timeout for `timeout`: rounded up to whole milliseconds so that a wait is
/// never shorter than asked, `-1` for no bound, saturated at `i32::MAX` ms (about 24 days).
pub fn timeout_ms_round_up(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        Some(t) => {
            let ms = t.as_nanos().div_ceil(1_000_000);
            ms.min(libc::c_int::MAX as u128) as libc::c_int
        }
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn collect(ep: &mut Epoll, t: Option<Duration>) -> Vec<Event> {
        let mut v = Vec::new();
        ep.wait(t, |e| v.push(e)).unwrap();
        v
    }

    #[test]
    fn level_triggered_until_drained() {
        let mut ep = Epoll::new().unwrap();
        let (mut a, mut b) = UnixStream::pair().unwrap();
        ep.update(a.as_raw_fd(), 1, 0, POLLIN).unwrap();
        assert!(collect(&mut ep, Some(Duration::ZERO)).is_empty());
        b.write_all(b"xy").unwrap();
        for _ in 0..3 {
            let evs = collect(&mut ep, Some(Duration::from_secs(1)));
            assert_eq!(
                evs,
                vec![Event {
                    token: 1,
                    events: POLLIN
                }]
            );
        }
        let mut buf = [0u8; 2];
        a.read_exact(&mut buf).unwrap();
        assert!(collect(&mut ep, Some(Duration::ZERO)).is_empty());
    }

    #[test]
    fn add_mod_del_map_to_kernel_errors() {
        let mut ep = Epoll::new().unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        ep.update(fd, 1, 0, POLLIN).unwrap();
        let e = ep.update(fd, 1, 0, POLLIN).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        ep.update(fd, 2, POLLIN, POLLOUT).unwrap();
        assert_eq!(
            collect(&mut ep, Some(Duration::ZERO)),
            vec![Event {
                token: 2,
                events: POLLOUT
            }]
        );
        ep.update(fd, 2, POLLOUT, 0).unwrap();
        let e = ep.update(fd, 2, POLLOUT, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(collect(&mut ep, Some(Duration::ZERO)).is_empty());
    }

    #[test]
    fn bad_fd_and_bad_bits() {
        let mut ep = Epoll::new().unwrap();
        let e = ep.update(-1, 1, 0, POLLIN).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        let (a, _b) = UnixStream::pair().unwrap();
        let e = ep.update(a.as_raw_fd(), 1, 0, 1 << 30).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn timeouts_are_not_early() {
        let mut ep = Epoll::new().unwrap();
        for fallback in [false, true] {
            if fallback {
                ep.force_millisecond_timeouts();
            }
            let t0 = Instant::now();
            assert!(collect(&mut ep, Some(Duration::from_micros(1500))).is_empty());
            assert!(
                t0.elapsed() >= Duration::from_micros(1500),
                "fallback={fallback}"
            );
        }
    }

    #[test]
    fn rounding_up_to_milliseconds() {
        assert_eq!(timeout_ms_round_up(None), -1);
        assert_eq!(timeout_ms_round_up(Some(Duration::ZERO)), 0);
        assert_eq!(timeout_ms_round_up(Some(Duration::from_nanos(1))), 1);
        assert_eq!(timeout_ms_round_up(Some(Duration::from_micros(1001))), 2);
        assert_eq!(timeout_ms_round_up(Some(Duration::from_millis(5))), 5);
        assert_eq!(timeout_ms_round_up(Some(Duration::MAX)), libc::c_int::MAX);
    }

    #[test]
    fn many_ready_fds_are_all_reported_eventually() {
        let mut ep = Epoll::new().unwrap();
        let pairs: Vec<_> = (0..200).map(|_| UnixStream::pair().unwrap()).collect();
        for (i, (a, b)) in pairs.iter().enumerate() {
            ep.update(a.as_raw_fd(), i as u64, 0, POLLIN).unwrap();
            (&*b).write_all(b"z").unwrap();
        }
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            ep.wait(Some(Duration::ZERO), |e| {
                seen.insert(e.token);
            })
            .unwrap();
        }
        assert_eq!(seen.len(), 200);
    }
}
