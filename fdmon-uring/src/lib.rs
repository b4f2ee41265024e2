//! A thin io_uring fd monitor: one ring, level-triggered readiness, and caller-built SQEs.
//!
//! This crate knows nothing of bottom halves, tasks or timers. Like `fdmon-epoll`, its currency
//! is a raw fd, a caller-chosen `u64` token and poll(2) event bits, and its surface is
//! [`Uring::update`]`(fd, token, old, new)`, [`Uring::wait`] and [`Uring::need_wait`]. On top of
//! that, [`Uring::push`] submits a caller-built SQE whose completion comes back by token.
//!
//! How readiness works (see `registry.rs` for the state machine):
//!
//! - a registration is one one-shot `POLL_ADD`, re-armed after every completion, so the
//!   contract is level-triggered like epoll's (multishot poll would be edge-triggered); unlike
//!   epoll, an event reports that the fd *became* ready since the poll was armed, so if the fd
//!   was drained before the caller looks, the caller sees one spurious event;
//! - [`Uring::update`] only stages the change; it reaches the submission queue at the next
//!   [`Uring::wait`], in the same system call as the wait itself;
//! - removal sends a `POLL_REMOVE`; the registration's slot lives until its `POLL_ADD` returns,
//!   and a generation in each `user_data` makes a late completion for a reused slot harmless.
//!
//! How waiting works:
//!
//! - `wait(Some(Duration::ZERO))` submits what is queued without waiting, and when nothing is
//!   queued it makes no system call at all: it only reads the completion ring;
//! - a timed wait passes its timeout with `IORING_ENTER_EXT_ARG` (no TIMEOUT SQE whose timespec
//!   could dangle), and `EINTR` is retried with the time that remains;
//! - a short submission (the kernel stopped at a failing SQE) is retried, a full submission
//!   queue is submitted to make room, and completions the kernel kept aside when the completion
//!   queue overflowed are flushed back (`IORING_FEAT_NODROP` is required);
//! - a busy kernel (`EAGAIN`/`EBUSY` from `io_uring_enter`) is cured by reaping completions,
//!   or, when there are none, waited out with short pauses (50 µs doubling, 12.75 ms in all)
//!   before the error is returned, as liburing's callers are told to.
//!
//! Close an fd only after removing its registration: an armed `POLL_ADD` holds the file, and a
//! re-arm after the close would poll whatever file the number names by then (epoll's `dup`
//! caveat, in io_uring form). A `POLL_ADD` that fails (`EBADF`) parks its registration until the
//! caller changes it, instead of re-arming in a loop.
//!
//! ```
//! use fdmon_uring::{Event, Uring, POLLIN};
//! use std::os::fd::AsRawFd;
//! use std::time::Duration;
//!
//! let mut ring = Uring::new(64)?;
//! let (a, b) = std::os::unix::net::UnixStream::pair()?;
//! ring.update(a.as_raw_fd(), 7, 0, POLLIN)?;
//! std::io::Write::write_all(&mut &b, b"x")?;
//! let mut seen = Vec::new();
//! ring.wait(Some(Duration::from_secs(1)), |ev| seen.push(ev))?;
//! assert_eq!(seen, vec![Event::Ready { token: 7, events: POLLIN }]);
//! # Ok::<(), std::io::Error>(())
//! ```

mod busy;
mod doorbell;
mod enter;
mod registry;
mod user_data;
mod wait;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

pub use doorbell::Doorbell;
pub use io_uring;
use io_uring::IoUring;
use io_uring::squeue::{self, EntryMarker};

use busy::Faults;
use enter::Enter;
use registry::{Registry, Target};
pub use user_data::MAX_USER_TOKEN;

/// Readable.
pub const POLLIN: u32 = libc::POLLIN as u32;
/// Urgent data.
pub const POLLPRI: u32 = libc::POLLPRI as u32;
/// Writable.
pub const POLLOUT: u32 = libc::POLLOUT as u32;
/// Error condition; always reported.
pub const POLLERR: u32 = libc::POLLERR as u32;
/// Hang-up; always reported.
pub const POLLHUP: u32 = libc::POLLHUP as u32;
/// Peer closed its writing half.
pub const POLLRDHUP: u32 = libc::POLLRDHUP as u32;
/// The interest bits a caller may ask for (`POLLERR`/`POLLHUP` are accepted and implied).
pub const INTEREST_MASK: u32 = POLLIN | POLLPRI | POLLOUT | POLLRDHUP | POLLERR | POLLHUP;

/// Ring setups, newest kernels first; [`Uring::new`] takes the first one the kernel accepts.
///
/// - `COOP_TASKRUN` (5.19) with `TASKRUN_FLAG`, and `SINGLE_ISSUER` (6.0): completion work
///   (poll wakeups above all) is not forced on this thread by an interrupt while it runs
///   callbacks; `IORING_SQ_TASKRUN` in the shared ring says when such work is pending, so a
///   zero wait can still tell from memory alone whether it must enter the kernel.
/// - The same without `SINGLE_ISSUER`; then `SUBMIT_ALL` (5.18) alone; then nothing.
///
/// `DEFER_TASKRUN` is not used on purpose: with it, a poll(2) or epoll on the ring fd does not
/// wake when deferred work arrives (measured here on 6.18: the wait ran to its timeout), and
/// that fd is what a foreign event loop watches to drive the reactor.
type Setup<S> = fn(&mut io_uring::Builder<S>);
/// (A function rather than a constant: the builder's type depends on the SQE size.)
fn setups<S: EntryMarker>() -> [Setup<S>; 4] {
    [
        |b| {
            b.setup_submit_all()
                .setup_single_issuer()
                .setup_coop_taskrun()
                .setup_taskrun_flag();
        },
        |b| {
            b.setup_submit_all()
                .setup_coop_taskrun()
                .setup_taskrun_flag();
        },
        |b| {
            b.setup_submit_all();
        },
        |_| {},
    ]
}

/// What [`Uring::wait`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A registration is ready.
    Ready {
        /// The registration's token.
        token: u64,
        /// The poll(2) bits that are ready.
        events: u32,
    },
    /// An SQE given to [`Uring::push`] completed.
    Complete {
        /// The token given to [`Uring::push`].
        token: u64,
        /// The CQE's result: non-negative on success, `-errno` on failure.
        result: i32,
        /// The CQE's flags (`IORING_CQE_F_*`).
        flags: u32,
    },
}

/// An io_uring instance used as an fd monitor.
///
/// Not `Send`: on kernels that support it the ring is set up with `IORING_SETUP_SINGLE_ISSUER`,
/// which binds it to the thread that created it.
pub struct Uring<S: EntryMarker = squeue::Entry> {
    ring: IoUring<S>,
    registry: Registry,
    /// SQEs that did not fit in the submission queue because the kernel would not take more
    /// yet; they go first at the next wait.
    backlog: Vec<S>,
    /// Free slots of the ring's fixed-file table (empty if the kernel has none to give).
    free_files: Vec<u32>,
    /// Errors injected by [`inject_errors`](Self::inject_errors).
    faults: Faults,
    /// How often `io_uring_enter` was busy with nothing to reap, and paused before a retry.
    busy_pauses: u64,
    /// How the hot waits enter the kernel (by registered ring fd where possible).
    enter: Enter,
    /// The ring's fd as its [`Doorbell`]s see it; withdrawn at drop.
    doorbells: doorbell::Target,
    _single_thread: std::marker::PhantomData<*const ()>,
}

impl<S: EntryMarker> Drop for Uring<S> {
    fn drop(&mut self) {
        // Before the ring's fd closes (with the `ring` field, after this): no doorbell may
        // post to whatever reuses its number.
        doorbell::withdraw(&self.doorbells);
        // The registration holds a reference to the ring's file in this thread's table.
        self.enter.unregister(&self.ring);
    }
}

impl<S: EntryMarker> std::fmt::Debug for Uring<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("fd", &self.ring.as_raw_fd())
            .field("sq_entries", &self.ring.params().sq_entries())
            .field("sqe_bytes", &std::mem::size_of::<S>())
            .field("registrations", &self.registry.len())
            .field("backlog", &self.backlog.len())
            .finish()
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

impl Uring {
    /// Creates a ring with `entries` submission slots (rounded up to a power of two by the
    /// kernel; the completion queue gets twice as many).
    ///
    /// # Errors
    /// The error of `io_uring_setup`: `ENOSYS` (no io_uring), `EPERM` (forbidden by seccomp or
    /// `kernel.io_uring_disabled`), `ENOMEM` (locked-memory limit), `EMFILE`; `Unsupported` when
    /// the kernel lacks `IORING_FEAT_EXT_ARG` or `IORING_FEAT_NODROP` (before 5.11).
    pub fn new(entries: u32) -> io::Result<Self> {
        Self::build(entries)
    }
}

impl Uring<squeue::Entry128> {
    /// Creates a ring of 128-byte SQEs (`IORING_SETUP_SQE128`, Linux 5.19), whose
    /// [`push`](Uring::push) takes [`squeue::Entry128`]: for `IORING_OP_URING_CMD` commands
    /// with up to 80 bytes of payload (`opcode::UringCmd80`), such as FUSE's ring entries or
    /// NVMe passthrough. Every other opcode works on it too: [`push`](Uring::push) converts an
    /// [`squeue::Entry`]. Only rings that ask pay for the larger entries: a ring from
    /// [`new`](Uring::new) is unchanged.
    ///
    /// ```
    /// use fdmon_uring::{Event, Uring, io_uring::opcode};
    /// use std::time::Duration;
    /// let mut ring = Uring::new_sqe128(8)?;
    /// // SAFETY: a NOP refers to no memory. (A 64-byte SQE converts.)
    /// unsafe { ring.push(opcode::Nop::new().build(), 5) }?;
    /// let mut seen = Vec::new();
    /// ring.wait(Some(Duration::from_secs(1)), |ev| seen.push(ev))?;
    /// assert_eq!(seen, vec![Event::Complete { token: 5, result: 0, flags: 0 }]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`new`](Uring::new); `EINVAL` from a kernel without 128-byte SQEs (before 5.19).
    pub fn new_sqe128(entries: u32) -> io::Result<Self> {
        Self::build(entries)
    }
}

impl<S: EntryMarker> Uring<S> {
    /// The ring, with the newest setup the kernel accepts.
    fn build(entries: u32) -> io::Result<Self> {
        let entries = entries.clamp(1, 32768);
        let mut last = None;
        let mut ring = None;
        for setup in setups::<S>() {
            let mut b = IoUring::<S>::builder();
            b.setup_clamp();
            setup(&mut b);
            match b.build(entries) {
                Ok(r) => {
                    ring = Some(r);
                    break;
                }
                // A flag this kernel does not know: try the next, older set.
                Err(e) if errno(&e) == libc::EINVAL => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        let ring = ring.ok_or_else(|| last.expect("at least one setup was tried"))?;
        let p = ring.params();
        if !p.is_feature_ext_arg() || !p.is_feature_nodrop() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "fdmon-uring needs IORING_FEAT_EXT_ARG and IORING_FEAT_NODROP (Linux 5.11 or later)",
            ));
        }
        let free_files = fixed_file_table(&ring);
        let enter = Enter::register(&ring);
        let doorbells = std::sync::Arc::new(std::sync::RwLock::new(Some(ring.as_raw_fd())));
        Ok(Uring {
            enter,
            doorbells,
            ring,
            registry: Registry::default(),
            backlog: Vec::new(),
            free_files,
            faults: Faults::default(),
            busy_pauses: 0,
            _single_thread: std::marker::PhantomData,
        })
    }

    /// Moves the registration of `fd` from interest `old` to `new` (poll(2) bits): `old == 0`
    /// adds, `new == 0` removes, anything else modifies the interest and token. The change is
    /// staged and reaches the kernel at the next [`wait`](Self::wait).
    ///
    /// # Errors
    /// The same as epoll's: `EINVAL` for unknown bits, `EBADF` for an invalid fd, `EPERM` for a
    /// regular file or directory, `EEXIST` when adding a registered fd, `ENOENT` when modifying
    /// or removing an unregistered one.
    pub fn update(&mut self, fd: RawFd, token: u64, old: u32, new: u32) -> io::Result<()> {
        if (old | new) & !INTEREST_MASK != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fdmon-uring: unknown event bits {:#x}",
                    (old | new) & !INTEREST_MASK
                ),
            ));
        }
        match (old != 0, new != 0) {
            (false, false) => Ok(()),
            (false, true) => {
                self.registry.check_new(fd)?;
                let file = self.fix(fd);
                self.registry.add(fd, file, token, new);
                Ok(())
            }
            (true, true) => self.registry.modify(fd, token, new),
            (true, false) => {
                if let Target::Fixed(i) = self.registry.remove(fd)? {
                    // The slot lets go of the file; a POLL_ADD still in flight holds its own
                    // reference until it completes, so the slot can be reused at once.
                    let _ = self.ring.submitter().register_files_update(i, &[-1]);
                    self.free_files.push(i);
                }
                Ok(())
            }
        }
    }

    /// Puts `fd`'s file in a free fixed-file slot, so that its polls follow the file, not the
    /// number. Without a free slot (or on kernels without sparse tables), polls use the number.
    fn fix(&mut self, fd: RawFd) -> Target {
        let Some(i) = self.free_files.pop() else {
            return Target::Fd(fd);
        };
        match self.ring.submitter().register_files_update(i, &[fd]) {
            Ok(_) => Target::Fixed(i),
            Err(_) => {
                self.free_files.push(i);
                Target::Fd(fd)
            }
        }
    }

    /// Number of free slots in the fixed-file table (0 on kernels without sparse tables).
    pub fn free_fixed_files(&self) -> usize {
        self.free_files.len()
    }

    /// Queues a caller-built SQE (on a ring of 128-byte SQEs, a 64-byte one converts); its
    /// completion is reported as [`Event::Complete`] with `token`. The SQE's own `user_data` is overwritten. When the submission queue is full it
    /// is submitted to make room; SQEs the kernel cannot take yet (it is busy: `EBUSY`,
    /// `EAGAIN`) wait in a backlog that the next [`wait`](Self::wait) submits first. The
    /// backlog holds at most as many SQEs as the submission queue: past that, the SQE is
    /// refused with `WouldBlock` and the caller must let `wait` reap completions first.
    ///
    /// # Safety
    /// Every buffer, fd and pointer the SQE refers to must stay valid until its completion has
    /// been reported by `wait` (or the ring is dropped: dropping a `Uring` waits for nothing, so
    /// memory used by operations in flight must outlive it).
    ///
    /// # Errors
    /// `InvalidInput` if `token` is above [`MAX_USER_TOKEN`]; `WouldBlock` when the submission
    /// queue and the backlog are full; the error of `io_uring_enter` if making room fails for
    /// a reason other than the kernel being busy.
    pub unsafe fn push(&mut self, entry: impl Into<S>, token: u64) -> io::Result<()> {
        if token > MAX_USER_TOKEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fdmon-uring: user tokens must be at most MAX_USER_TOKEN (bit 63 is reserved)",
            ));
        }
        if self.backlog_full() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "fdmon-uring: the submission queue and its backlog are full (the kernel takes no more until completions are reaped)",
            ));
        }
        self.push_raw(with_user_data(entry.into(), token))
    }

    /// As [`push`](Self::push), past the backlog's bound: for SQEs whose number the caller
    /// bounds otherwise (one cancellation per operation in flight), which must not be refused.
    ///
    /// # Safety
    /// As for `push`.
    ///
    /// # Errors
    /// As for `push`, never `WouldBlock`.
    pub unsafe fn push_unbounded(&mut self, entry: impl Into<S>, token: u64) -> io::Result<()> {
        if token > MAX_USER_TOKEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fdmon-uring: user tokens must be at most MAX_USER_TOKEN (bit 63 is reserved)",
            ));
        }
        self.push_raw(with_user_data(entry.into(), token))
    }

    /// Whether [`push`](Self::push) would refuse an SQE now: the backlog holds as many SQEs as
    /// the submission queue (which is full).
    pub fn backlog_full(&self) -> bool {
        self.backlog.len() >= self.ring.params().sq_entries() as usize
    }

    /// SQEs waiting in the backlog for the kernel to take them.
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    /// Queues `entry` as is: in the submission queue, or in the backlog while older entries
    /// wait there or the kernel will not take more.
    fn push_raw(&mut self, entry: S) -> io::Result<()> {
        // SAFETY: internal SQEs refer to no memory; for caller SQEs `push` passed the duty on.
        unsafe { push_or_backlog(&mut self.ring, &mut self.backlog, &mut self.faults, entry) }
    }

    /// Whether a call to [`wait`](Self::wait) has work to do even with a zero timeout: staged
    /// registration changes, queued SQEs, completions already in the ring, or completion work
    /// the kernel deferred to this thread (`IORING_SQ_TASKRUN`: a poll that fired) or kept
    /// aside (a completion-queue overflow), which only an enter turns into completions.
    pub fn need_wait(&mut self) -> bool {
        self.registry.has_staged()
            || !self.backlog.is_empty()
            || !self.ring.completion().is_empty()
            || {
                let sq = self.ring.submission();
                !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
            }
    }

    /// Whether completions are waiting, judged from the shared ring alone (no system call):
    /// CQEs in the completion ring, or deferred completion work flagged for this thread. A
    /// busy-polling caller stops spinning when this turns `true`.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty() || self.ring.submission().taskrun()
    }

    /// Number of live readiness registrations.
    pub fn registrations(&self) -> usize {
        self.registry.len()
    }

    /// Number of registration slots in use: the live registrations plus the removed ones whose
    /// `POLL_ADD` has not come back yet.
    pub fn slots(&self) -> usize {
        self.registry.slots()
    }

    /// Makes the next `count` calls to `io_uring_enter` made by [`wait`](Self::wait) (or by a
    /// [`push`](Self::push) that submits to make room) fail with `errno` without reaching the
    /// kernel, as if the kernel had returned it: for testing how
    /// a caller lives with a failing or busy kernel. `count` 0 ends an injection.
    ///
    /// ```
    /// # use fdmon_uring::Uring;
    /// # use std::time::Duration;
    /// let mut ring = Uring::new(8)?;
    /// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// use std::os::fd::AsRawFd;
    /// ring.update(a.as_raw_fd(), 1, 0, fdmon_uring::POLLOUT)?;
    /// // A busy kernel twice: paused out and retried, the caller sees nothing.
    /// ring.inject_errors(libc::EAGAIN, 2);
    /// assert_eq!(ring.wait(Some(Duration::from_secs(1)), |_| {})?, 1);
    /// assert_eq!(ring.busy_pauses(), 2);
    /// // A broken ring: the error reaches the caller.
    /// ring.inject_errors(libc::EBADF, 1);
    /// ring.update(a.as_raw_fd(), 1, fdmon_uring::POLLOUT, fdmon_uring::POLLIN)?;
    /// assert_eq!(ring.wait(None, |_| {}).unwrap_err().raw_os_error(), Some(libc::EBADF));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn inject_errors(&mut self, errno: i32, count: u32) {
        self.faults.set(errno, count);
    }

    /// How many times `io_uring_enter` was busy (`EAGAIN`/`EBUSY`) with no completion to
    /// reap, so that [`wait`](Self::wait) paused before retrying.
    pub fn busy_pauses(&self) -> u64 {
        self.busy_pauses
    }

    /// The ring's fd as a new [`Doorbell`] shares it.
    fn doorbell_target(&self) -> doorbell::Target {
        self.doorbells.clone()
    }

    /// Whether this thread enters the ring by a registered ring fd (`IORING_REGISTER_RING_FDS`:
    /// no fd lookup per `io_uring_enter`). `false` on kernels before 5.18, and for rings beyond
    /// the 16 a thread can register; those enter by their fd, which works the same.
    pub fn ring_fd_registered(&self) -> bool {
        self.enter.registered()
    }

    /// The underlying ring, for registering buffers or files, or probing opcodes.
    pub fn ring(&self) -> &IoUring<S> {
        &self.ring
    }
}

/// `entry` with its `user_data` set to `token`.
fn with_user_data<S: EntryMarker>(mut entry: S, token: u64) -> S {
    entry.set_user_data(token);
    entry
}

/// Registers a sparse fixed-file table on `ring` sized to the process's fd limit (at most
/// 16384 slots) and returns its slots, or none if the kernel cannot (before 5.19).
fn fixed_file_table<S: EntryMarker>(ring: &IoUring<S>) -> Vec<u32> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to write.
    let n = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur.clamp(64, 16384) as u32
    } else {
        1024
    };
    match ring.submitter().register_files_sparse(n) {
        Ok(()) => (0..n).rev().collect(),
        Err(_) => Vec::new(),
    }
}

/// Queues `entry` in the submission queue, submitting to make room when it is full, or in the
/// backlog while older entries wait there or the kernel will not take more yet.
///
/// # Safety
/// Whatever `entry` refers to must stay valid until its completion is reaped.
unsafe fn push_or_backlog<S: EntryMarker>(
    ring: &mut IoUring<S>,
    backlog: &mut Vec<S>,
    faults: &mut Faults,
    entry: S,
) -> io::Result<()> {
    if backlog.is_empty() {
        // SAFETY: the caller vouches for the entry's memory.
        if unsafe { ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        let submitted = match faults.take() {
            Some(e) => Err(e),
            None => ring.submit(),
        };
        match submitted {
            Ok(_) => {
                // SAFETY: as above.
                if unsafe { ring.submission().push(&entry) }.is_ok() {
                    return Ok(());
                }
            }
            Err(e) if matches!(errno(&e), libc::EBUSY | libc::EAGAIN | libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    backlog.push(entry);
    Ok(())
}

impl<S: EntryMarker> AsFd for Uring<S> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the ring fd stays open as long as `self.ring`, which outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.ring.as_raw_fd()) }
    }
}

impl<S: EntryMarker> AsRawFd for Uring<S> {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
