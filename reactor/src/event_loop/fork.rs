//! A reactor across `fork(2)`.
//!
//! A child process gets a copy of its parent's memory, a reactor included, but the kernel
//! objects behind it are shared with the parent, not copied: the epoll instance (a
//! registration the child changed would change the parent's), the io_uring instance and its
//! submission and completion rings, which are mapped shared (an SQE the child wrote would be
//! the parent's to submit, a completion the child reaped the parent's to lose), and the
//! eventfd. The ring is also bound to the parent's thread (`IORING_SETUP_SINGLE_ISSUER`: the
//! child's enters fail with `EEXIST`), and its registered fd (`IORING_REGISTER_RING_FDS`) is
//! the parent thread's, which the child does not have. None of it can be used from the child.
//!
//! So the child's first use of a reactor it inherited fails, before it reaches the kernel:
//! [`Reactor::try_poll`](crate::Reactor::try_poll) and the calls that register fds or
//! submit operations return an error that says why; [`Reactor::poll`](crate::Reactor::poll)
//! and [`Reactor::run`](crate::Reactor::run), which survive OS errors, panic with it (using a
//! reactor in the child is a bug of the program, not a condition to wait out). Dropping it in
//! the child releases only the child's copies (its memory, its fds), never what the parent's
//! rings hold. A reactor built in the child after the fork is an ordinary one.
//!
//! A fork is noticed through a `pthread_atfork` handler (registered when the first reactor
//! is built), so it takes `fork(2)` through the C library: a raw `clone` system call is not
//! seen. `posix_spawn` and `std::process::Command` do not run the handler and need none: the
//! child runs no code of this process.

use std::io;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

/// Forks this process has been through, as the child: incremented in every child.
static FORKS: AtomicU64 = AtomicU64::new(0);
static HOOK: Once = Once::new();

extern "C" fn in_child() {
    // Relaxed: the child has one thread now; nothing else is published through it.
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// The process a reactor was built in.
#[derive(Debug)]
pub(crate) struct Birth(u64);

impl Birth {
    /// This process, now.
    pub(crate) fn now() -> Birth {
        HOOK.call_once(|| {
            // SAFETY: registers a handler that only increments an atomic, which is
            // async-signal-safe, as a fork child handler must be.
            unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        });
        // Relaxed: see `in_child`.
        Birth(FORKS.load(Ordering::Relaxed))
    }

    /// Whether this is a child of the process the reactor was built in.
    #[inline]
    pub(crate) fn inherited(&self) -> bool {
        // Relaxed: see `in_child`.
        FORKS.load(Ordering::Relaxed) != self.0
    }

    /// An error unless the reactor is used in the process it was built in.
    #[inline]
    pub(crate) fn check(&self) -> io::Result<()> {
        if self.inherited() {
            return Err(forked());
        }
        Ok(())
    }
}

/// The error of a reactor used in a child process.
pub(crate) fn forked() -> io::Error {
    io::Error::other(
        "reactor: this reactor was built before fork() and is used in the child process; its epoll or io_uring instance is the parent's and cannot be used here (build a new reactor in the child)",
    )
}
