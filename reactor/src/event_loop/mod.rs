//! The loop itself. This file holds [`Reactor`] (its state, creation, the current-reactor
//! marker, BH and timer shortcuts, counters, drop); the rest is one file per concern:
//! `builder.rs` (settings), `iteration.rs` (`poll` and the loops on it), `external.rs`
//! (driving it from a foreign loop; `embed.rs` is its timerfd), `fds.rs` (fd registration),
//! `sqe.rs` (caller-built io_uring SQEs), `fixed_table.rs` (the ring's fixed-buffer table), `spin.rs` (busy
//! polling: every decision of it; `polling.rs` its parameters and poll-time arithmetic,
//! `contention.rs` the thread's wait for a CPU), `fork.rs` (a reactor across `fork`),
//! `monitor_errors.rs` (what a failed wait does) and `stats.rs`. It calls every layer below
//! (the lock-free core, scheduling, fds and the backend); the runtime above reaches it through
//! its public surface and `Reactor::with_current`.

mod builder;
mod contention;
pub(crate) mod embed;
mod external;
mod fds;
mod fixed_table;
mod fork;
mod iteration;
pub(crate) mod monitor_errors;
pub(crate) mod polling;
pub(crate) mod recv_ring;
mod spin;
mod sqe;
pub(crate) mod stats;

pub use builder::{
    Builder, DEFAULT_MAX_SQES_IN_FLIGHT, DEFAULT_TASK_BUDGET, DEFAULT_URING_ENTRIES, SocketIo,
    Wakeup,
};

use std::cell::{Cell, RefCell};
use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::ptr;
use std::time::Duration;

use crate::event_loop::embed::ExternalTimer;
use crate::event_loop::monitor_errors::MonitorErrors;
use crate::event_loop::polling::PollParams;
use crate::event_loop::stats::{LocalStats, Stats};
use crate::fd::backend::{Backend, Ev, Monitor, RingShape};
use crate::fd::handlers::{FdHandler, FdId, Handlers};
use crate::fd::interest::Interest;
use crate::fd::ops::{Completion, OpId, Ops};
use crate::lockfree::notify::{self, Notifier};
use crate::lockfree::sync::{Arc, AtomicBool, Ordering};
use crate::sched::bh::{self, Bh, BhHome, BhNode, Callback, Kind, Peek};
use crate::sched::clock::Clock;
use crate::sched::handle::{self, Handle};
use crate::sched::pool::ThreadPool;
use crate::sched::timer::{Timer, Timers};

/// The token of the reactor's own eventfd in the fd monitor (fd-handler tokens have bit 63
/// clear).
const NOTIFIER_TOKEN: u64 = u64::MAX;
/// The token of the timerfd that wakes a foreign loop for the reactor's timers.
const EXTERNAL_TIMER_TOKEN: u64 = u64::MAX - 1;

/// What a reactor shares with other threads (through [`Handle`], [`Bh`] and [`Timer`]).
pub(crate) struct Remote {
    pub(crate) notifier: Notifier,
    pub(crate) clock: Clock,
    /// Set by [`Handle::stop`]/[`Reactor::stop`]; makes [`Reactor::run`] return.
    pub(crate) stop: AtomicBool,
}

thread_local! {
    /// The reactor whose `poll` is running on this thread (innermost), or null.
    static CURRENT: Cell<*const Reactor> = const { Cell::new(ptr::null()) };
}

/// An event loop: bottom halves, fd handlers and timers, on io_uring or epoll.
///
/// A `Reactor` lives on the thread that created it (its home thread; it is neither `Send` nor
/// `Sync`). Other threads reach it through a [`Handle`], [`Bh`] or [`Timer`]. Each call to
/// [`poll`](Self::poll) is one iteration: compute a timeout, wait on the fd monitor, then run
/// BHs, fd handlers and expired timers. Every method may be called from inside a callback,
/// `poll` included (a nested poll).
///
/// ```
/// use reactor::Reactor;
/// use std::time::Duration;
///
/// let r = Reactor::new()?;
/// let h = r.handle();
/// std::thread::spawn(move || {
///     h.oneshot(|r: &Reactor| r.stop()).unwrap();
/// });
/// r.run(); // returns once the other thread's one-shot has run
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Reactor {
    pub(crate) shared: Arc<Remote>,
    monitor: RefCell<Monitor>,
    bhs: BhHome,
    timers: Timers,
    handlers: Handlers,
    ops: Ops,
    /// Nesting depth of `poll` on this reactor.
    depth: Cell<u32>,
    task_budget: u32,
    /// What is left of the current task poll's I/O budget (see `sched/coop.rs`).
    io_budget: crate::sched::coop::Budget,
    pool: ThreadPool,
    socket_io: SocketIo,
    /// How sockets do I/O here, from `socket_io` and the backend: resolved once, when the
    /// reactor is built ([`SocketPath`]).
    socket_path: SocketPath,
    /// Busy polling: its state and decisions (`spin.rs`).
    spin: spin::Spin,
    /// `prepare_external_wait` announced a wait that `poll` has not ended yet.
    external_wait: Cell<bool>,
    /// Makes the reactor's fd readable at the nearest timer, for foreign loops.
    external_timer: RefCell<Option<ExternalTimer>>,
    stats: LocalStats,
    /// Failures of the fd monitor: their count, log rate limit and pause.
    monitor_errors: MonitorErrors,
    /// The buffer pool registered as the ring's fixed buffers, if any.
    fixed_buffers: RefCell<Option<fixed_table::FixedSlot>>,
    /// The provided-buffer ring of multishot receives, once one was armed.
    recv_ring: RefCell<Option<std::rc::Rc<crate::fd::buf_ring::RecvRing>>>,
    /// The process it was built in (see `fork.rs`).
    birth: fork::Birth,
    _not_send: PhantomData<*const ()>,
}

/// How a reactor's sockets do I/O, resolved from [`SocketIo`] and the backend when it is
/// built: on epoll always readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketPath {
    /// Readiness and non-blocking system calls.
    Readiness,
    /// io_uring operations (`RECV`, `SEND`, `ACCEPT`, `CONNECT`).
    Completion,
    /// As `Completion`, with a multishot receive per stream and a multishot accept per
    /// listener.
    Multishot,
}

/// Marks this reactor current on the thread and counts the nesting depth, for one `poll`.
pub(crate) struct Enter<'a> {
    r: &'a Reactor,
    prev: *const Reactor,
}

impl<'a> Enter<'a> {
    fn new(r: &'a Reactor) -> Self {
        let prev = CURRENT.with(|c| c.replace(r));
        r.depth.set(r.depth.get() + 1);
        Enter { r, prev }
    }
}

impl Drop for Enter<'_> {
    fn drop(&mut self) {
        let depth = self.r.depth.get() - 1;
        self.r.depth.set(depth);
        if depth == 0 {
            self.r.handlers.bury();
        }
        CURRENT.with(|c| c.set(self.prev));
    }
}

impl Reactor {
    /// Creates a reactor with the default settings (see [`Builder`]).
    ///
    /// # Errors
    /// As [`Builder::build`].
    pub fn new() -> io::Result<Reactor> {
        Builder::new().build()
    }

    /// A [`Builder`].
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// The backend this reactor runs on: [`Backend::Uring`] or [`Backend::Epoll`].
    pub fn backend(&self) -> Backend {
        self.monitor.borrow().kind()
    }

    /// The thread pool for blocking work.
    pub fn thread_pool(&self) -> &ThreadPool {
        &self.pool
    }

    /// How other threads wake this reactor when it sleeps: [`Wakeup::Auto`] when it gets ring
    /// messages, else [`Wakeup::EventFd`].
    ///
    /// ```
    /// let r = reactor::Reactor::new()?;
    /// if r.backend() == reactor::Backend::Epoll {
    ///     assert_eq!(r.wakeup(), reactor::Wakeup::EventFd);
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn wakeup(&self) -> Wakeup {
        if self.shared.notifier.rings() {
            Wakeup::Auto
        } else {
            Wakeup::EventFd
        }
    }

    /// How sockets do I/O (see [`SocketIo`]): the mode this reactor was built with (on epoll
    /// every mode means readiness).
    pub fn socket_io(&self) -> SocketIo {
        self.socket_io
    }

    /// How sockets do I/O on this reactor's backend (the one place the runtime asks).
    pub(crate) fn socket_path(&self) -> SocketPath {
        self.socket_path
    }

    /// A `Send + Sync` handle for other threads.
    pub fn handle(&self) -> Handle {
        Handle::new(self.shared.clone())
    }

    /// Calls `f` with the reactor whose [`poll`](Self::poll) is running on this thread (the
    /// innermost one), or returns `None` outside of any poll.
    ///
    /// ```
    /// use reactor::Reactor;
    /// let r = Reactor::new()?;
    /// assert!(Reactor::with_current(|_| ()).is_none());
    /// r.oneshot(|_| assert!(Reactor::with_current(|cur| cur.backend()).is_some()));
    /// r.poll(false);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn with_current<R>(f: impl FnOnce(&Reactor) -> R) -> Option<R> {
        let p = CURRENT.with(Cell::get);
        // SAFETY: CURRENT is non-null only while `poll(&self)` of that reactor runs further up
        // this thread's stack (`Enter` restores it on the way out, also when unwinding), so the
        // reactor is alive and borrowed for at least the duration of `f`.
        (!p.is_null()).then(|| f(unsafe { &*p }))
    }

    /// As [`with_current`](Self::with_current), only for the reactor that owns `shared`.
    pub(crate) fn with_current_for<R>(
        shared: &Arc<Remote>,
        f: impl FnOnce(&Reactor) -> R,
    ) -> Option<R> {
        Self::with_current(|r| Arc::ptr_eq(&r.shared, shared).then(|| f(r))).flatten()
    }

    /// Makes this reactor current on the thread until the guard is dropped.
    pub(crate) fn enter(&self) -> Enter<'_> {
        Enter::new(self)
    }

    pub(crate) fn shared(&self) -> &Arc<Remote> {
        &self.shared
    }

    pub(crate) fn bhs(&self) -> &BhHome {
        &self.bhs
    }

    pub(crate) fn timers(&self) -> &Timers {
        &self.timers
    }

    /// Creates a BH (see [`Bh`]). The callback runs on this thread each time the BH is
    /// scheduled and the reactor iterates.
    pub fn bh(&self, callback: impl FnMut(&Reactor) + 'static) -> Bh {
        let node = BhNode::new(&self.shared, Kind::Bh, Callback::Many(Box::new(callback)));
        self.bhs.register(&node);
        Bh::new(node)
    }

    /// Runs `callback` once, in the next iteration, on this thread. It counts as progress.
    pub fn oneshot(&self, callback: impl FnOnce(&Reactor) + 'static) {
        let posted = handle::post_oneshot(
            &self.shared,
            Kind::OneShot,
            crate::sched::clock::DISARMED,
            Callback::Once(Box::new(callback)),
        );
        debug_assert!(posted.is_ok(), "a live reactor's list is open");
    }

    /// Creates a timer (see [`Timer`]), not armed.
    pub fn timer(&self, callback: impl FnMut(&Reactor) + 'static) -> Timer {
        let node = BhNode::new(
            &self.shared,
            Kind::Timer,
            Callback::Many(Box::new(callback)),
        );
        self.bhs.register(&node);
        Timer::new(node)
    }

    /// Runs `callback` once on this thread when `after` has passed.
    pub fn oneshot_after(&self, after: Duration, callback: impl FnOnce(&Reactor) + 'static) {
        let deadline = crate::sched::clock::ns_after(self.shared.clock.now_ns(), after);
        let posted = handle::post_oneshot(
            &self.shared,
            Kind::OneShotTimer,
            deadline,
            Callback::Once(Box::new(callback)),
        );
        debug_assert!(posted.is_ok(), "a live reactor's list is open");
    }

    /// Counters since the reactor was created.
    pub fn stats(&self) -> Stats {
        let notify_skipped = self.shared.notifier.skipped();
        let (eventfd_writes, ring_messages) = self.shared.notifier.wakeups();
        let mut s =
            self.stats
                .snapshot(eventfd_writes, notify_skipped, self.monitor_errors.total());
        s.ring_messages = ring_messages;
        s.recv_buffers_held = self
            .recv_ring
            .borrow()
            .as_ref()
            .map_or(0, |r| u64::from(r.held()));
        s
    }

    /// Number of live fd registrations.
    pub fn fd_count(&self) -> usize {
        self.handlers.len()
    }

    /// Number of live BHs, timers and tasks (one-shots not included).
    pub fn bh_count(&self) -> usize {
        self.bhs.registered()
    }

    pub(crate) fn count_bh(&self) {
        self.stats.bh_runs.set(self.stats.bh_runs.get() + 1);
    }

    pub(crate) fn count_recv_arm(&self) {
        self.stats.recv_arms.set(self.stats.recv_arms.get() + 1);
    }

    pub(crate) fn count_recv_copied(&self, n: u32) {
        let c = &self.stats.recv_bytes_copied;
        c.set(c.get() + u64::from(n));
    }

    pub(crate) fn count_inline_io(&self) {
        self.stats.inline_io.set(self.stats.inline_io.get() + 1);
    }

    pub(crate) fn count_inline_write_stall(&self) {
        let n = &self.stats.inline_write_stalls;
        n.set(n.get() + 1);
    }

    pub(crate) fn io_budget(&self) -> &crate::sched::coop::Budget {
        &self.io_budget
    }

    pub(crate) fn count_io_budget_yield(&self) {
        let n = &self.stats.io_budget_yields;
        n.set(n.get() + 1);
    }

    pub(crate) fn count_task(&self) {
        self.stats.task_polls.set(self.stats.task_polls.get() + 1);
    }

    pub(crate) fn task_polls(&self) -> u64 {
        self.stats.task_polls.get()
    }

    pub(crate) fn count_fd_dispatch(&self) {
        self.stats
            .fd_dispatches
            .set(self.stats.fd_dispatches.get() + 1);
    }

    pub(crate) fn count_timer(&self) {
        self.stats
            .timers_fired
            .set(self.stats.timers_fired.get() + 1);
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        // Close the BH list first, so that nothing new arrives; then drop every callback here,
        // on the home thread. The fd monitor goes last (dropping it drops its registrations).
        if self.birth.inherited() {
            // In a child of the process that built it: the rings are the parent's, and the
            // kernel works on the parent's memory, not this copy. Release the copy only.
            self.ops.clear();
            std::mem::forget(self.recv_ring.borrow_mut().take());
        } else {
            self.quiesce_ops();
            self.drop_recv_ring();
        }
        self.bhs.shutdown(&self.shared.notifier.list);
        self.timers.shutdown();
        self.handlers.clear();
    }
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("backend", &self.backend())
            .field("fds", &self.fd_count())
            .field("bhs", &self.bh_count())
            .finish()
    }
}
