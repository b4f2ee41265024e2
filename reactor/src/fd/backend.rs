//! The backend contract, and the one place that knows which fd monitors exist.
//!
//! A backend (an fd monitor crate) offers three things, in plain data only:
//!
//! - `update(fd, token, old, new)`: move a registration of `fd` from poll(2) interest `old` to
//!   `new`; `old == 0` adds, `new == 0` removes. Errors are epoll's, on both backends: `EBADF`,
//!   `EEXIST`, `ENOENT`, `EPERM` (regular files), `EINVAL` (unknown bits).
//! - `wait(timeout, sink)`: wait up to `timeout` (`None`: no bound, zero: only look) and hand
//!   every ready registration (`token`, poll bits) to the sink. Readiness is level-triggered: a
//!   registration that stays ready is reported by every wait. `EINTR` is retried inside.
//! - io_uring only: caller-built SQEs whose completions come back through the same sink.
//!
//! The reactor reaches the chosen backend through the private [`Monitor`] enum, a plain
//! `match` per call: no `dyn`, no allocation, and no `#[cfg]` anywhere else in the crate.
//!
//! Choice: with both features (the default), [`Backend::Auto`] tries io_uring and falls back to
//! epoll, with a `tracing` warning, when io_uring setup fails with `ENOSYS` (no io_uring),
//! `EPERM`/`EACCES` (seccomp, `kernel.io_uring_disabled`), `ENOMEM` (locked-memory limit) or
//! `Unsupported` (a kernel older than 5.11). The environment variable `REACTOR_BACKEND`
//! (`uring`, `epoll` or `auto`) overrides `Auto`. A forced backend that cannot start is an
//! error that names the cause, never a silent fallback.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Which fd monitor a reactor uses.
///
/// ```
/// use reactor::{Backend, Builder};
/// let r = Builder::new().backend(Backend::Auto).build()?;
/// assert_ne!(r.backend(), Backend::Auto); // a running reactor names what it got
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// io_uring if it can start, epoll otherwise (or as `REACTOR_BACKEND` says).
    #[default]
    Auto,
    /// io_uring (feature `uring`), or an error.
    Uring,
    /// epoll (feature `epoll`), or an error.
    Epoll,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        })
    }
}

impl std::str::FromStr for Backend {
    type Err = io::Error;
    fn from_str(s: &str) -> io::Result<Backend> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Backend::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Backend::Uring),
            "epoll" => Ok(Backend::Epoll),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown reactor backend {other:?}: expected uring, epoll or auto"),
            )),
        }
    }
}

/// The environment variable that overrides [`Backend::Auto`].
pub const BACKEND_ENV: &str = "REACTOR_BACKEND";

/// What a backend reports from a wait.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ev {
    Ready {
        token: u64,
        events: u32,
    },
    // Only the io_uring backend produces completions.
    #[cfg_attr(not(feature = "uring"), allow(dead_code))]
    Complete {
        token: u64,
        result: i32,
        flags: u32,
    },
}

// One per reactor: the size difference costs nothing, a box would cost a pointer chase per call.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Monitor {
    #[cfg(feature = "uring")]
    Uring(fdmon_uring::Uring),
    /// A ring of 128-byte SQEs ([`Builder::sqe128`](crate::Builder::sqe128)). A variant of
    /// its own, so that a ring of 64-byte SQEs runs the same code as before: the SQE size is
    /// a type, not a branch in the ring's hot paths.
    #[cfg(feature = "uring")]
    Uring128(fdmon_uring::Uring<io_uring::squeue::Entry128>),
    #[cfg(feature = "epoll")]
    Epoll(fdmon_epoll::Epoll),
}

/// `match`es a monitor with one body for a ring of either SQE size (`$u` binds the ring)
/// and one for epoll (`$e`).
macro_rules! on_monitor {
    ($m:expr, $u:pat => $ring:expr, $e:pat => $epoll:expr $(,)?) => {
        match $m {
            #[cfg(feature = "uring")]
            Monitor::Uring($u) => $ring,
            #[cfg(feature = "uring")]
            Monitor::Uring128($u) => $ring,
            #[cfg(feature = "epoll")]
            Monitor::Epoll($e) => $epoll,
        }
    };
}

/// Wakes a reactor's wait by posting a completion into its ring (a ring message), instead of
/// writing the eventfd that the ring polls; see `fdmon_uring::Doorbell`. `Send` and `Sync`.
#[derive(Debug)]
pub(crate) enum BackendBell {
    #[cfg(feature = "uring")]
    Ring(fdmon_uring::Doorbell),
}

impl crate::lockfree::notify::MessageBell for BackendBell {
    fn ring(&self) -> io::Result<()> {
        match *self {
            #[cfg(feature = "uring")]
            BackendBell::Ring(ref d) => d.ring(),
        }
    }
}

#[cfg(not(any(feature = "uring", feature = "epoll")))]
compile_error!("reactor needs at least one backend feature: `uring` or `epoll`");

/// An error that keeps the OS error and adds what it means here.
#[derive(Debug)]
struct Explained {
    what: String,
    source: io::Error,
}

impl fmt::Display for Explained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for Explained {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn explain(what: impl Into<String>, source: io::Error) -> io::Error {
    io::Error::new(
        source.kind(),
        Explained {
            what: what.into(),
            source,
        },
    )
}

#[cfg(feature = "uring")]
fn uring_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel has no io_uring (ENOSYS)",
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "io_uring is forbidden here (EPERM: a seccomp filter, as container runtimes install, \
             or sysctl kernel.io_uring_disabled)"
        }
        Some(libc::ENOMEM) => "not enough locked memory for the rings (ENOMEM: RLIMIT_MEMLOCK)",
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out of file descriptors",
        _ if e.kind() == io::ErrorKind::Unsupported => "the kernel is too old (needs 5.11)",
        _ => "io_uring setup failed",
    }
}

/// Whether `Auto` may fall back to epoll after this io_uring error.
#[cfg(all(feature = "uring", feature = "epoll"))]
fn can_fall_back(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOMEM)
    ) || e.kind() == io::ErrorKind::Unsupported
}

/// `choice`, with `Auto` resolved through [`BACKEND_ENV`].
fn resolve(choice: Backend) -> io::Result<Backend> {
    if choice != Backend::Auto {
        return Ok(choice);
    }
    match std::env::var(BACKEND_ENV) {
        Ok(v) => v
            .parse()
            .map_err(|e| explain(format!("environment variable {BACKEND_ENV}"), e)),
        Err(std::env::VarError::NotPresent) => Ok(Backend::Auto),
        Err(e) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("environment variable {BACKEND_ENV}: {e}"),
        )),
    }
}

#[cfg(not(all(feature = "uring", feature = "epoll")))]
fn not_built(which: Backend) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("the {which} backend was not built: enable the reactor crate's `{which}` feature"),
    )
}

/// The io_uring backend's ring as the builder asked for it.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "uring"), allow(dead_code))]
pub(crate) struct RingShape {
    /// Submission-queue entries.
    pub(crate) entries: u32,
    /// 128-byte SQEs.
    pub(crate) sqe128: bool,
}

impl RingShape {
    #[cfg(feature = "uring")]
    fn open(self) -> io::Result<Monitor> {
        Ok(if self.sqe128 {
            Monitor::Uring128(fdmon_uring::Uring::new_sqe128(self.entries)?)
        } else {
            Monitor::Uring(fdmon_uring::Uring::new(self.entries)?)
        })
    }
}

impl Monitor {
    /// Opens the backend `choice` asks for (see the module docs for `Auto`).
    pub(crate) fn open(choice: Backend, ring: RingShape) -> io::Result<Monitor> {
        let choice = resolve(choice)?;
        tracing::debug!(%choice, "reactor: choosing a backend");
        match choice {
            Backend::Uring => Self::open_uring(ring),
            Backend::Epoll => Self::open_epoll(),
            Backend::Auto => Self::open_auto(ring),
        }
    }

    #[cfg(all(feature = "uring", feature = "epoll"))]
    fn open_auto(ring: RingShape) -> io::Result<Monitor> {
        match ring.open() {
            Ok(m) => {
                tracing::debug!("reactor: backend io_uring");
                Ok(m)
            }
            Err(e) if can_fall_back(&e) => {
                tracing::warn!(
                    error = %e,
                    "reactor: io_uring unavailable ({}); falling back to epoll",
                    uring_hint(&e)
                );
                Self::open_epoll()
            }
            Err(e) => Err(explain(format!("io_uring: {}", uring_hint(&e)), e)),
        }
    }

    #[cfg(not(all(feature = "uring", feature = "epoll")))]
    fn open_auto(ring: RingShape) -> io::Result<Monitor> {
        #[cfg(feature = "uring")]
        return Self::open_uring(ring);
        #[cfg(not(feature = "uring"))]
        {
            let _ = ring;
            Self::open_epoll()
        }
    }

    fn open_uring(ring: RingShape) -> io::Result<Monitor> {
        #[cfg(feature = "uring")]
        {
            let m = ring
                .open()
                .map_err(|e| explain(format!("io_uring: {}", uring_hint(&e)), e))?;
            tracing::debug!(sqe128 = ring.sqe128, "reactor: backend io_uring");
            Ok(m)
        }
        #[cfg(not(feature = "uring"))]
        {
            let _ = ring;
            Err(not_built(Backend::Uring))
        }
    }

    fn open_epoll() -> io::Result<Monitor> {
        #[cfg(feature = "epoll")]
        {
            let e = fdmon_epoll::Epoll::new().map_err(|e| explain("epoll_create1", e))?;
            tracing::debug!("reactor: backend epoll");
            Ok(Monitor::Epoll(e))
        }
        #[cfg(not(feature = "epoll"))]
        Err(not_built(Backend::Epoll))
    }

    pub(crate) fn kind(&self) -> Backend {
        on_monitor!(self,
            _ => Backend::Uring,
            _ => Backend::Epoll,
        )
    }

    pub(crate) fn update(&mut self, fd: RawFd, token: u64, old: u32, new: u32) -> io::Result<()> {
        on_monitor!(self,
            u => u.update(fd, token, old, new),
            e => e.update(fd, token, old, new),
        )
    }

    /// Whether a zero-timeout wait has something to do besides looking: staged registration
    /// changes or SQEs to submit, completions to reap. Always `false` on epoll.
    pub(crate) fn need_wait(&mut self) -> bool {
        on_monitor!(self,
            u => u.need_wait(),
            e => e.need_wait(),
        )
    }

    /// Whether events are waiting, judged from memory alone (for busy polling): on io_uring,
    /// completions in the ring; on epoll, never (only a system call could tell).
    pub(crate) fn has_events_hint(&mut self) -> bool {
        on_monitor!(self,
            u => u.has_completions(),
            _ => false,
        )
    }

    /// Whether fd readiness can only be learnt with a system call (epoll), so that a busy
    /// poll must make one now and then to see fds at all.
    pub(crate) fn needs_syscall_to_poll(&self) -> bool {
        on_monitor!(self,
            _ => false,
            _ => true,
        )
    }

    /// The fd that is readable while the monitor has something to report: the ring fd or the
    /// epoll fd.
    pub(crate) fn raw_fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        on_monitor!(self,
            u => u.as_raw_fd(),
            e => e.as_raw_fd(),
        )
    }

    /// A doorbell that wakes this monitor's waits with a ring message.
    ///
    /// # Errors
    /// `Unsupported` on epoll and on kernels without ring-less ring messages (before 6.13).
    pub(crate) fn doorbell(&self) -> io::Result<BackendBell> {
        on_monitor!(self,
            u => fdmon_uring::Doorbell::new(u).map(BackendBell::Ring),
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "an epoll reactor has no ring to post messages to",
            )),
        )
    }

    /// Registers `iovs` as the ring's fixed buffers (`IORING_REGISTER_BUFFERS`); epoll has
    /// nothing to register.
    ///
    /// # Safety
    /// The memory `iovs` describe must stay allocated until
    /// [`unregister_buffers`](Self::unregister_buffers) or the monitor's drop.
    pub(crate) unsafe fn register_buffers(&mut self, iovs: &[libc::iovec]) -> io::Result<()> {
        on_monitor!(self,
            // SAFETY: the caller's guarantee is passed on.
            u => unsafe { u.ring().submitter().register_buffers(iovs) },
            _ => {
                let _ = iovs;
                Ok(())
            },
        )
    }

    /// Drops the ring's fixed buffers, if it has any.
    pub(crate) fn unregister_buffers(&mut self) -> io::Result<()> {
        on_monitor!(self,
            u => u.ring().submitter().unregister_buffers(),
            _ => Ok(()),
        )
    }

    /// Registers a provided-buffer ring of `entries` at `addr` as buffer group `group`
    /// (`IORING_REGISTER_PBUF_RING`); `Unsupported` on epoll.
    ///
    /// # Safety
    /// The ring's entries and the buffers they name stay allocated until
    /// [`unregister_buf_ring`](Self::unregister_buf_ring) or the monitor's drop, and until no
    /// operation that may pick a buffer from the group is in flight.
    pub(crate) unsafe fn register_buf_ring(
        &mut self,
        addr: u64,
        entries: u16,
        group: u16,
    ) -> io::Result<()> {
        on_monitor!(self,
            // SAFETY: the caller's guarantee is passed on.
            u => unsafe {
                u.ring()
                    .submitter()
                    .register_buf_ring_with_flags(addr, entries, group, 0)
            },
            _ => {
                let _ = (addr, entries, group);
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "provided buffers need the io_uring backend; this reactor runs on epoll",
                ))
            },
        )
    }

    /// Drops the provided-buffer ring of `group`.
    pub(crate) fn unregister_buf_ring(&mut self, group: u16) -> io::Result<()> {
        on_monitor!(self,
            u => u.ring().submitter().unregister_buf_ring(group),
            _ => {
                let _ = group;
                Ok(())
            },
        )
    }

    /// Drops the kernel side of a registration whose fd was closed while registered and whose
    /// number now names another file. io_uring: the registration still polls the old file
    /// (through its fixed-file slot), so it is removed by number like any other. epoll: the
    /// kernel dropped it when the file closed (unless the file lives on through a `dup`, which
    /// no call on this number can reach), and a `DEL` would remove the new file instead; so
    /// nothing is done.
    pub(crate) fn retire(&mut self, fd: RawFd, token: u64, old: u32) {
        on_monitor!(self,
            u => {
                if old != 0 {
                    let _ = u.update(fd, token, old, 0);
                }
            },
            _ => {
                let _ = (fd, token, old);
            },
        )
    }

    /// Queues a caller-built SQE whose completion comes back as [`Ev::Complete`] with `token`;
    /// `WouldBlock` when the ring's submission queue and backlog are full, unless `bounded` is
    /// false (for SQEs bounded otherwise: cancellations).
    ///
    /// # Safety
    /// What the SQE refers to must stay valid until its completion has been reported.
    pub(crate) unsafe fn push(
        &mut self,
        sqe: io_uring::squeue::Entry,
        token: u64,
        bounded: bool,
    ) -> io::Result<()> {
        on_monitor!(self,
            u => if bounded {
                // SAFETY: the caller's guarantee is passed on.
                unsafe { u.push(sqe, token) }
            } else {
                // SAFETY: the caller's guarantee is passed on.
                unsafe { u.push_unbounded(sqe, token) }
            },
            _ => {
                let _ = (sqe, token, bounded);
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "io_uring operations need the io_uring backend; this reactor runs on epoll",
                ))
            },
        )
    }

    /// As [`push`](Self::push), for a 128-byte SQE: only a ring built with
    /// [`Builder::sqe128`](crate::Builder::sqe128) takes one.
    ///
    /// # Safety
    /// As for `push`.
    pub(crate) unsafe fn push128(
        &mut self,
        sqe: io_uring::squeue::Entry128,
        token: u64,
        bounded: bool,
    ) -> io::Result<()> {
        match self {
            #[cfg(feature = "uring")]
            Monitor::Uring128(u) if bounded => {
                // SAFETY: the caller's guarantee is passed on.
                unsafe { u.push(sqe, token) }
            }
            #[cfg(feature = "uring")]
            Monitor::Uring128(u) => {
                // SAFETY: the caller's guarantee is passed on.
                unsafe { u.push_unbounded(sqe, token) }
            }
            _ => {
                let _ = (sqe, token, bounded);
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a 128-byte SQE needs a ring of 128-byte SQEs: build the reactor with \
                     Builder::sqe128(true) on the io_uring backend",
                ))
            }
        }
    }

    /// Whether the ring takes 128-byte SQEs.
    pub(crate) fn sqe128(&self) -> bool {
        #[cfg(feature = "uring")]
        if let Monitor::Uring128(_) = self {
            return true;
        }
        false
    }

    /// Whether the ring's submission queue and backlog are full (never on epoll).
    pub(crate) fn sq_full(&self) -> bool {
        on_monitor!(self,
            u => u.backlog_full(),
            _ => false,
        )
    }

    /// See [`Reactor::inject_monitor_errors`](crate::Reactor::inject_monitor_errors).
    pub(crate) fn inject_errors(&mut self, errno: i32, count: u32) {
        on_monitor!(self,
            u => u.inject_errors(errno, count),
            e => e.inject_errors(errno, count),
        )
    }

    pub(crate) fn wait(
        &mut self,
        timeout: Option<Duration>,
        mut sink: impl FnMut(Ev),
    ) -> io::Result<usize> {
        on_monitor!(self,
            u => u.wait(timeout, |ev| match ev {
                fdmon_uring::Event::Ready { token, events } => sink(Ev::Ready { token, events }),
                fdmon_uring::Event::Complete {
                    token,
                    result,
                    flags,
                } => sink(Ev::Complete {
                    token,
                    result,
                    flags,
                }),
            }),
            e => e.wait(timeout, |ev| {
                sink(Ev::Ready {
                    token: ev.token,
                    events: ev.events,
                })
            }),
        )
    }
}
