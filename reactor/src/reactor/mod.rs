//! The loop itself: [`Reactor`] and its [`Builder`], one iteration (`poll`), driving it from a
//! foreign loop (`embed.rs` and `prepare_external_wait`), fd registration, caller-built SQEs,
//! adaptive polling (`polling.rs`), what it does when the fd monitor fails
//! (`monitor_errors.rs`) and its counters (`stats.rs`). It calls every layer below (the
//! lock-free core, scheduling, fds and the backend); the runtime above reaches it through its
//! public surface and `Reactor::with_current`.

pub(crate) mod embed;
pub(crate) mod monitor_errors;
pub(crate) mod polling;
pub(crate) mod stats;

use std::cell::{Cell, RefCell};
use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::ptr;
use std::time::Duration;

use crate::fd::backend::{Backend, Ev, Monitor};
use crate::fd::handlers::{FdHandler, FdId, Handlers};
use crate::fd::interest::Interest;
use crate::fd::ops::{Completion, OpId, Ops};
use crate::lockfree::notify::{self, Notifier};
use crate::lockfree::sync::{Arc, AtomicBool, Ordering};
use crate::reactor::embed::ExternalTimer;
use crate::reactor::monitor_errors::MonitorErrors;
use crate::reactor::polling::{Adaptive, PollParams};
use crate::reactor::stats::{LocalStats, Stats};
use crate::sched::bh::{self, Bh, BhHome, BhNode, Callback, Peek};
use crate::sched::handle::{self, Handle};
use crate::sched::pool::ThreadPool;
use crate::sched::timer::{Clock, Timer, Timers};

/// How sockets do their owned-buffer I/O and `accept` on the io_uring backend.
///
/// Chosen by measurement (the bench's `tcp-echo` scenario: 64 loopback connections, one
/// request in flight each, a raw epoll client on the other core; the server thread is
/// saturated, so its CPU time per request is the figure that decides). Four runs of 5–7:
///
/// | message | `Completion` requests/s, server CPU | `Readiness` requests/s, server CPU |
/// |---|---|---|
/// | 64 B | 196.9k–210.0k, 4.7–5.0 µs/req | 187.9k–191.2k, 5.2–5.3 µs/req |
/// | 1 KiB | 190.0k–195.4k, 5.1–5.2 µs/req | 186.0k–188.8k, 5.3–5.4 µs/req |
///
/// Completion operations won every run by 3–10%: a `RECV` that finds no data is parked by the
/// kernel's internal poll and completes with the data in one step, where readiness pays for a
/// one-shot `POLL_ADD` re-arm plus a separate `recv(2)`/`send(2)` system call. So
/// [`Completion`](SocketIo::Completion) is the default; [`Readiness`](SocketIo::Readiness)
/// remains selectable. On epoll both mean readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SocketIo {
    /// Readiness (a poll on the fd) and non-blocking system calls, on both backends.
    Readiness,
    /// io_uring `RECV`/`SEND`/`ACCEPT` operations (readiness on epoll).
    #[default]
    Completion,
}

/// The token of the reactor's own eventfd in the fd monitor (fd-handler tokens have bit 63
/// clear).
const NOTIFIER_TOKEN: u64 = u64::MAX;
/// The token of the timerfd that wakes a foreign loop for the reactor's timers.
const EXTERNAL_TIMER_TOKEN: u64 = u64::MAX - 1;

/// Most consecutive iterations that skip the fd monitor because busy polling found work.
const MAX_SKIPPED_WAITS: u32 = 8;

/// Default submission-queue size of the io_uring backend.
pub const DEFAULT_URING_ENTRIES: u32 = 256;

/// What a reactor shares with other threads (through [`Handle`], [`Bh`] and [`Timer`]).
pub(crate) struct Shared {
    pub(crate) notifier: Notifier,
    pub(crate) clock: Clock,
    /// Set by [`Handle::stop`]/[`Reactor::stop`]; makes [`Reactor::run`] return.
    pub(crate) stop: AtomicBool,
}

thread_local! {
    /// The reactor whose `poll` is running on this thread (innermost), or null.
    static CURRENT: Cell<*const Reactor> = const { Cell::new(ptr::null()) };
}

/// Builds a [`Reactor`] with non-default settings.
///
/// ```
/// use reactor::{Backend, Builder};
/// let r = Builder::new().backend(Backend::Auto).uring_entries(512).build()?;
/// assert!(matches!(r.backend(), Backend::Uring | Backend::Epoll));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    backend: Backend,
    uring_entries: u32,
    task_budget: u32,
    pool: Option<ThreadPool>,
    socket_io: SocketIo,
    poll: Option<PollParams>,
}

/// Default number of task polls per iteration (see [`Builder::task_budget`]).
pub const DEFAULT_TASK_BUDGET: u32 = 256;

impl Default for Builder {
    fn default() -> Self {
        Builder {
            backend: Backend::Auto,
            uring_entries: DEFAULT_URING_ENTRIES,
            task_budget: DEFAULT_TASK_BUDGET,
            pool: None,
            socket_io: SocketIo::default(),
            poll: None,
        }
    }
}

impl Builder {
    /// Default settings: [`Backend::Auto`], [`DEFAULT_URING_ENTRIES`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Chooses the backend. `Auto` (the default) may be overridden by the environment
    /// variable [`BACKEND_ENV`](crate::BACKEND_ENV); a forced backend is never replaced.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Submission-queue size of the io_uring backend (1..=32768, checked by
    /// [`build`](Self::build); the kernel rounds it up to a power of two). Not used by epoll.
    pub fn uring_entries(mut self, entries: u32) -> Self {
        self.uring_entries = entries;
        self
    }

    /// Most task polls per iteration (at least 1). Tasks woken beyond it wait for the next
    /// iteration, after fd handlers and timers have had their turn.
    pub fn task_budget(mut self, polls: u32) -> Self {
        self.task_budget = polls.max(1);
        self
    }

    /// The thread pool for blocking work ([`spawn_blocking`](crate::spawn_blocking), file I/O
    /// on epoll). Default: the process-wide [`ThreadPool::default_pool`].
    pub fn thread_pool(mut self, pool: ThreadPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// How sockets do I/O on the io_uring backend (see [`SocketIo`]).
    pub fn socket_io(mut self, mode: SocketIo) -> Self {
        self.socket_io = mode;
        self
    }

    /// Adaptive busy polling (see [`PollParams`]). Unset, it is off for a reactor and
    /// [`PollParams::IOTHREAD`] for an [`IoThread`](crate::IoThread).
    pub fn poll(mut self, params: PollParams) -> Self {
        self.poll = Some(params);
        self
    }

    /// Whether adaptive polling was left unset (for [`IoThread`](crate::IoThread)'s default).
    pub(crate) fn poll_is_default(&self) -> bool {
        self.poll.is_none()
    }

    /// Creates the reactor on the calling thread, which becomes its home thread.
    ///
    /// # Errors
    /// `InvalidInput` for a bad `REACTOR_BACKEND` or `uring_entries`; `Unsupported` for a backend that was not
    /// built; the setup error of a forced backend, with its cause named (for example io_uring
    /// forbidden by seccomp); `EMFILE` and the like when out of resources.
    pub fn build(self) -> io::Result<Reactor> {
        if !(1..=32768).contains(&self.uring_entries) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "uring_entries must be 1..=32768, not {}",
                    self.uring_entries
                ),
            ));
        }
        let shared = Arc::new(Shared {
            notifier: notify::new()?,
            clock: Clock::new(),
            stop: AtomicBool::new(false),
        });
        let mut monitor = Monitor::open(self.backend, self.uring_entries)?;
        monitor.update(shared.notifier.fd(), NOTIFIER_TOKEN, 0, libc::POLLIN as u32)?;
        Ok(Reactor {
            shared,
            monitor: RefCell::new(monitor),
            bhs: BhHome::new(),
            timers: Timers::new(),
            handlers: Handlers::new(),
            ops: Ops::new(),
            depth: Cell::new(0),
            task_budget: self.task_budget,
            pool: self.pool.unwrap_or_else(ThreadPool::default_pool),
            socket_io: self.socket_io,
            adaptive: Adaptive::new(self.poll.unwrap_or(PollParams::OFF)),
            poll_mode: Cell::new(false),
            external_wait: Cell::new(false),
            skipped_waits: Cell::new(0),
            external_timer: RefCell::new(None),
            stats: LocalStats::default(),
            monitor_errors: MonitorErrors::default(),
            _not_send: PhantomData,
        })
    }
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
    pub(crate) shared: Arc<Shared>,
    monitor: RefCell<Monitor>,
    bhs: BhHome,
    timers: Timers,
    handlers: Handlers,
    ops: Ops,
    /// Nesting depth of `poll` on this reactor.
    depth: Cell<u32>,
    task_budget: u32,
    pool: ThreadPool,
    socket_io: SocketIo,
    adaptive: Adaptive,
    /// Busy polling has started and the loop has not blocked since.
    poll_mode: Cell<bool>,
    /// `prepare_external_wait` announced a wait that `poll` has not ended yet.
    external_wait: Cell<bool>,
    /// Consecutive iterations whose wait was skipped because spinning found work.
    skipped_waits: Cell<u32>,
    /// Makes the reactor's fd readable at the nearest timer, for foreign loops.
    external_timer: RefCell<Option<ExternalTimer>>,
    stats: LocalStats,
    /// Failures of the fd monitor: their count, log rate limit and pause.
    monitor_errors: MonitorErrors,
    _not_send: PhantomData<*const ()>,
}

/// Marks this reactor current on the thread and counts the nesting depth, for one `poll`.
/// What an iteration does with an error of the fd monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnError {
    /// Return it ([`Reactor::try_poll`]).
    Return,
    /// Count, log, pause and go on ([`Reactor::poll`]).
    Survive,
}

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

    /// How sockets do I/O (see [`SocketIo`]).
    pub fn socket_io(&self) -> SocketIo {
        self.socket_io
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
        shared: &Arc<Shared>,
        f: impl FnOnce(&Reactor) -> R,
    ) -> Option<R> {
        Self::with_current(|r| Arc::ptr_eq(&r.shared, shared).then(|| f(r))).flatten()
    }

    /// Makes this reactor current on the thread until the guard is dropped.
    pub(crate) fn enter(&self) -> Enter<'_> {
        Enter::new(self)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
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
        let node = BhNode::new(&self.shared, 0, Callback::Many(Box::new(callback)));
        self.bhs.register(&node);
        Bh::new(node)
    }

    /// Runs `callback` once, in the next iteration, on this thread. It counts as progress.
    pub fn oneshot(&self, callback: impl FnOnce(&Reactor) + 'static) {
        let posted = handle::post_oneshot(
            &self.shared,
            0,
            bh::DISARMED,
            Callback::Once(Box::new(callback)),
        );
        debug_assert!(posted.is_ok(), "a live reactor's list is open");
    }

    /// Creates a timer (see [`Timer`]), not armed.
    pub fn timer(&self, callback: impl FnMut(&Reactor) + 'static) -> Timer {
        let node = BhNode::new(&self.shared, bh::TIMER, Callback::Many(Box::new(callback)));
        self.bhs.register(&node);
        Timer::new(node)
    }

    /// Runs `callback` once on this thread when `after` has passed.
    pub fn oneshot_after(&self, after: Duration, callback: impl FnOnce(&Reactor) + 'static) {
        let deadline = crate::sched::timer::ns_after(self.shared.clock.now_ns(), after);
        let posted = handle::post_oneshot(
            &self.shared,
            bh::TIMER,
            deadline,
            Callback::Once(Box::new(callback)),
        );
        debug_assert!(posted.is_ok(), "a live reactor's list is open");
    }

    /// Registers `fd` with `handler`'s callbacks, watching for what they handle (readable if
    /// there is a read callback, writable if there is a write callback).
    ///
    /// The reactor does not own `fd`: keep it open until [`remove_fd`](Self::remove_fd), and
    /// remove it before closing it (an io_uring poll would otherwise keep watching whatever
    /// file the number names by then). An fd can be registered once per reactor.
    ///
    /// # Errors
    /// `InvalidInput` if `handler` has neither a read nor a write callback; `EBADF` for an
    /// invalid fd; `EEXIST` if `fd` is already registered; `EPERM` for a regular file or
    /// directory, which are always ready and cannot be watched.
    pub fn add_fd(&self, fd: RawFd, handler: FdHandler) -> io::Result<FdId> {
        let natural = handler.natural_interest();
        let interest = handler.initial_interest();
        if natural.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an FdHandler needs a read or a write callback",
            ));
        }
        if (interest.is_readable() && !natural.is_readable())
            || (interest.is_writable() && !natural.is_writable())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interest {interest:?} needs a callback the FdHandler was not given"),
            ));
        }
        // Checks the fd now (EBADF, EPERM), also when it is not watched yet, and identifies its
        // file, to tell a second registration of an open fd (EEXIST) from a new file behind a
        // number whose registered fd was closed without `remove_fd`.
        let file = file_identity(fd)?;
        if let Some((old, old_file, old_interest)) = self.handlers.live_for_fd(fd) {
            if old_file == file {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            tracing::debug!(
                fd,
                ?old,
                "reactor: fd closed while registered and reused; retiring the old registration"
            );
            self.monitor
                .borrow_mut()
                .retire(fd, old.token(), old_interest.poll_bits());
            self.handlers.mark_stale(old);
        }
        let id = self.handlers.insert(fd, file, handler, interest);
        let res = self
            .monitor
            .borrow_mut()
            .update(fd, id.token(), 0, interest.poll_bits());
        if let Err(e) = res {
            self.handlers.forget(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Changes what the registration `id` waits for. [`Interest::NONE`] pauses it (it stays
    /// registered). Allowed from inside any callback.
    ///
    /// # Errors
    /// `NotFound` for an unknown or removed `id`; `InvalidInput` for an interest without a
    /// matching callback; the fd monitor's error otherwise.
    pub fn set_fd_interest(&self, id: FdId, interest: Interest) -> io::Result<()> {
        let (fd, old) = self.handlers.lookup(id, Some(interest))?;
        if old != interest {
            self.monitor.borrow_mut().update(
                fd,
                id.token(),
                old.poll_bits(),
                interest.poll_bits(),
            )?;
            self.handlers.set_interest(id, interest);
        }
        Ok(())
    }

    /// Removes the registration `id`. Allowed from inside any callback, its own included; no
    /// callback of `id` runs after this returns, and its callbacks are dropped once the
    /// outermost `poll` on the stack has finished dispatching.
    ///
    /// If the fd was closed before this call, the kernel has already forgotten it; the
    /// registration is removed all the same.
    ///
    /// # Errors
    /// `NotFound` for an unknown or removed `id`; the fd monitor's error otherwise.
    pub fn remove_fd(&self, id: FdId) -> io::Result<()> {
        let (fd, old) = self.handlers.lookup(id, None)?;
        if !old.is_empty() {
            let res = self
                .monitor
                .borrow_mut()
                .update(fd, id.token(), old.poll_bits(), 0);
            match res {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBADF) | Some(libc::ENOENT)) => {}
                Err(e) => return Err(e),
            }
        }
        self.handlers.remove(id, self.depth.get() > 0);
        Ok(())
    }

    /// Submits a caller-built io_uring SQE on this reactor's own ring; `on_complete` runs on
    /// this thread for its completion (for each of them while `Completion::more()` is set, for
    /// multishot operations). The SQE's `user_data` is the reactor's. The SQE reaches the
    /// kernel at the next iteration's wait. Completions are run before BHs.
    ///
    /// # Safety
    /// Every buffer, fd and pointer the SQE refers to must stay valid until `on_complete` has
    /// run for its last completion. Keeping them in `on_complete`'s captures is the simple way:
    /// the reactor drops the callback only after the final completion, and when the reactor
    /// itself is dropped it cancels and waits for every operation in flight first.
    ///
    /// # Errors
    /// `Unsupported` on the epoll backend; the ring's error if the SQE cannot be queued.
    ///
    /// ```
    /// use reactor::{Reactor, io_uring::opcode};
    /// let r = Reactor::new()?; // io_uring where the kernel allows it
    /// let done = std::rc::Rc::new(std::cell::Cell::new(None));
    /// let d2 = done.clone();
    /// // SAFETY: a NOP refers to no memory.
    /// match unsafe { r.submit_sqe(opcode::Nop::new().build(), move |_, c| d2.set(Some(c.result))) } {
    ///     Ok(_) => {
    ///         r.run_until(|| done.get().is_some());
    ///         assert_eq!(done.get(), Some(0));
    ///     }
    ///     // An epoll reactor has no ring.
    ///     Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::Unsupported),
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub unsafe fn submit_sqe(
        &self,
        sqe: io_uring::squeue::Entry,
        on_complete: impl FnMut(&Reactor, Completion) + 'static,
    ) -> io::Result<OpId> {
        let id = self.ops.insert(Box::new(on_complete));
        // SAFETY: the caller's guarantee is passed on.
        let res = unsafe { self.monitor.borrow_mut().push(sqe, id.token()) };
        if let Err(e) = res {
            self.ops.forget(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Asks the kernel to cancel the operation `id` (`IORING_OP_ASYNC_CANCEL`). Its callback
    /// still runs, with `-ECANCELED` or with the result it completed with first.
    ///
    /// # Errors
    /// `NotFound` if `id` is not in flight; the ring's error if the cancellation cannot be
    /// queued.
    pub fn cancel_sqe(&self, id: OpId) -> io::Result<()> {
        if !self.ops.contains(id) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{id:?} is not in flight"),
            ));
        }
        let sqe = io_uring::opcode::AsyncCancel::new(id.token()).build();
        // SAFETY: a cancellation refers to no memory.
        unsafe {
            self.monitor
                .borrow_mut()
                .push(sqe, crate::fd::ops::IGNORED_TOKEN)
        }
    }

    /// Number of io_uring operations in flight.
    pub fn ops_in_flight(&self) -> usize {
        self.ops.in_flight()
    }

    /// Cancels every operation in flight and waits for their completions, dropping their
    /// callbacks unrun (reactor drop). Bounded: after 10 s, the rest are leaked rather than
    /// freed under the kernel's feet.
    fn quiesce_ops(&self) {
        // (On epoll nothing is ever in flight: the loop below does not run.)
        {
            let ids: Vec<OpId> = self.ops.ids();
            for id in ids {
                let _ = self.cancel_sqe(id);
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while self.ops.in_flight() > 0 && std::time::Instant::now() < deadline {
                let res = self
                    .monitor
                    .borrow_mut()
                    .wait(Some(Duration::from_millis(10)), |ev| {
                        if let Ev::Complete {
                            token,
                            result,
                            flags,
                        } = ev
                        {
                            self.ops.complete(token, result, flags);
                        }
                    });
                self.ops.retire_queued();
                if res.is_err() {
                    break;
                }
            }
            if self.ops.in_flight() > 0 {
                tracing::error!(
                    in_flight = self.ops.in_flight(),
                    "reactor: io_uring operations still in flight at drop; leaking their memory"
                );
                self.ops.leak();
            }
        }
        self.ops.clear();
    }

    /// Runs one iteration: waits (if `blocking` and nothing is pending: up to the nearest timer,
    /// or without bound) and then runs what is ready. Returns `true` if progress was made: a
    /// BH that is not idle, an fd callback or a timer ran. A wakeup by [`Handle::notify`] alone
    /// is not progress, so `poll(true)` may return `false`.
    ///
    /// `poll` may be called from inside any callback (nested); the nested call first runs what
    /// the outer call had already collected.
    ///
    /// # Errors of the fd monitor
    /// `poll` never panics on an OS error and never gives up: the monitor's own retries
    /// cover what is transient (`EINTR`, a busy io_uring), and an error that remains is
    /// counted in [`Stats::monitor_errors`], logged (at most once a second), and the
    /// iteration still runs its BHs, timers and tasks; a blocking one first pauses (1 ms,
    /// doubling to 100 ms while the failures go on) so that a broken monitor costs no CPU
    /// spin. A daemon that wants to see the error uses [`try_poll`](Self::try_poll).
    ///
    /// # Panics
    /// A panic in a callback propagates out of `poll`; the reactor stays usable and the next
    /// `poll` goes on with the work that remained.
    pub fn poll(&self, blocking: bool) -> bool {
        match self.iterate(blocking, OnError::Survive) {
            Ok(progress) => progress,
            Err(e) => unreachable!("a surviving iteration returned {e}"),
        }
    }

    /// [`poll`](Self::poll), but an error of the fd monitor that remains after its own
    /// retries is returned instead of survived: the iteration stops there, runs nothing, and
    /// leaves the reactor as it was (a later `poll` or `try_poll` goes on normally).
    ///
    /// ```
    /// let r = reactor::Reactor::new()?;
    /// r.handle().oneshot(|_| {}).unwrap();
    /// assert!(r.try_poll(true)?);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// The fd monitor's error: for example `EBADF` if its fd was closed behind the reactor's
    /// back, or `EAGAIN`/`EBUSY` from an io_uring that stayed busy through every retry.
    pub fn try_poll(&self, blocking: bool) -> io::Result<bool> {
        self.iterate(blocking, OnError::Return)
    }

    /// One iteration; see [`poll`](Self::poll) and [`try_poll`](Self::try_poll) for what
    /// `on_error` chooses.
    fn iterate(&self, blocking: bool, on_error: OnError) -> io::Result<bool> {
        let _enter = Enter::new(self);
        self.stats.iterations.set(self.stats.iterations.get() + 1);
        let notifier = &self.shared.notifier;
        self.end_external_wait();

        let adaptive = blocking && self.adaptive.enabled();
        let start = if adaptive {
            self.shared.clock.now_ns()
        } else {
            0
        };
        self.handlers.set_now(start);
        let mut timeout = if blocking {
            self.timeout()
        } else {
            Some(Duration::ZERO)
        };
        let mut skip_wait = false;
        let mut polled_hit = false;
        if adaptive && timeout != Some(Duration::ZERO) && self.busy_poll(timeout, on_error)? {
            polled_hit = true;
            timeout = Some(Duration::ZERO);
            // Spinning found the work: a zero wait would only look at fds again (a system call
            // on epoll). Skip it, but not too many times in a row, so that fds without a poll
            // callback are still looked at.
            let skipped = self.skipped_waits.get();
            skip_wait = skipped < MAX_SKIPPED_WAITS && !self.monitor.borrow_mut().need_wait();
            self.skipped_waits
                .set(if skip_wait { skipped + 1 } else { 0 });
        }
        let announced = timeout != Some(Duration::ZERO);
        if announced && notifier.prepare_block() {
            timeout = Some(Duration::ZERO);
        }
        if timeout != Some(Duration::ZERO) {
            self.stats
                .blocking_waits
                .set(self.stats.blocking_waits.get() + 1);
            if self.poll_mode.replace(false) {
                // Really about to block: only now does poll mode end.
                self.handlers.set_poll_mode(self, false);
            }
        }
        tracing::trace!(?timeout, "reactor: wait");
        let res = if skip_wait { Ok(0) } else { self.wait(timeout) };
        if announced {
            notifier.finish_block();
        }
        if adaptive && !polled_hit {
            // (A hit took at most the poll time: the sweet spot, nothing to adjust, and no
            // clock read on the path to the work.)
            self.adaptive
                .adjust(self.shared.clock.now_ns().saturating_sub(start));
        }
        let events = match res {
            Ok(n) => {
                self.monitor_errors.succeeded();
                n
            }
            Err(e) => {
                let pause = self.monitor_failed(&e, on_error)?;
                // A wait that was to block pauses instead (up to its own bound); a zero
                // wait does not: work is due.
                match timeout {
                    Some(t) if t.is_zero() => {}
                    Some(t) => std::thread::sleep(pause.min(t)),
                    None => std::thread::sleep(pause),
                }
                0
            }
        };
        notifier.accept();

        let bh_runs = self.stats.bh_runs.get();
        let progress = self.ops.dispatch(self)
            | self.bhs.poll(self, self.task_budget)
            | self.handlers.dispatch(self)
            | match self.timers.next_deadline() {
                Some(_) => self.timers.run(self, self.shared.clock.now_ns()),
                None => false,
            };
        tracing::trace!(
            events,
            bhs_run = self.stats.bh_runs.get() - bh_runs,
            progress,
            "reactor: iteration done"
        );
        Ok(progress)
    }

    /// The fd monitor failed with `e`: returned as is if `on_error` says so, else counted and
    /// logged (see `monitor_errors.rs`), with the pause a blocking iteration should make.
    fn monitor_failed(&self, e: &io::Error, on_error: OnError) -> io::Result<Duration> {
        let pause = self.monitor_errors.failed(e, self.backend());
        match on_error {
            OnError::Return => Err(io::Error::new(
                e.kind(),
                format!("reactor: the {} fd monitor failed: {e}", self.backend()),
            )),
            OnError::Survive => Ok(pause),
        }
    }

    /// Waits on the fd monitor and files what it reports: the notifier's eventfd is drained,
    /// fd events queued for dispatch, completions queued for their callbacks.
    fn wait(&self, timeout: Option<Duration>) -> io::Result<usize> {
        let notifier = &self.shared.notifier;
        self.monitor.borrow_mut().wait(timeout, |ev| match ev {
            Ev::Ready {
                token: NOTIFIER_TOKEN,
                ..
            } => notifier.drain_eventfd(),
            Ev::Ready {
                token: EXTERNAL_TIMER_TOKEN,
                ..
            } => {
                if let Some(t) = self.external_timer.borrow().as_ref() {
                    t.drain();
                }
            }
            Ev::Ready { token, events } => self.handlers.ready(token, events),
            Ev::Complete {
                token,
                result,
                flags,
            } => self.ops.complete(token, result, flags),
        })
    }

    /// Adaptive polling: spins for up to the current poll time (and at most `timeout`),
    /// checking without system calls for work. Returns `true` if some was found.
    /// A failed zero wait ends the spin: the blocking wait that follows meets the error again
    /// and handles it.
    fn busy_poll(&self, timeout: Option<Duration>, on_error: OnError) -> io::Result<bool> {
        // Staged changes (re-arms after events) go to the kernel first, so that what they
        // watch can be seen while spinning; a zero wait also collects what is already there.
        if self.monitor.borrow_mut().need_wait() {
            match self.wait(Some(Duration::ZERO)) {
                Ok(n) if n > 0 => return Ok(true),
                Ok(_) => {}
                Err(e) => {
                    self.monitor_failed(&e, on_error)?;
                    return Ok(false);
                }
            }
        }
        let window = self.adaptive.window(timeout);
        if window == 0 {
            return Ok(false);
        }
        if !self.poll_mode.replace(true) {
            self.handlers.set_poll_mode(self, true);
        }
        let clock = &self.shared.clock;
        let deadline = clock.now_ns().saturating_add(window);
        let mut spins = 0u32;
        let syscall_poll = self.monitor.borrow().needs_syscall_to_poll();
        loop {
            // The notifier's own poll check: a load of `notified`, no system call.
            let found = self.shared.notifier.is_notified()
                || self.handlers.poll_recent(self)
                || self.monitor.borrow_mut().has_events_hint();
            if found {
                self.stats.poll_hits.set(self.stats.poll_hits.get() + 1);
                return Ok(true);
            }
            spins = spins.wrapping_add(1);
            // On epoll, fds can only be seen with a system call: one zero wait every 64 spins
            // (about a microsecond), which the spinning pays for anyway.
            if spins % 64 == 0 && syscall_poll {
                match self.wait(Some(Duration::ZERO)) {
                    Ok(n) if n > 0 => {
                        self.stats.poll_hits.set(self.stats.poll_hits.get() + 1);
                        return Ok(true);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.monitor_failed(&e, on_error)?;
                        return Ok(false);
                    }
                }
            }
            // The clock (a vDSO call) is read every 16 spins only.
            if spins % 16 == 0 && clock.now_ns() >= deadline {
                self.stats.poll_misses.set(self.stats.poll_misses.get() + 1);
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Changes the adaptive polling parameters (see [`PollParams`]); takes effect at the next
    /// iteration.
    pub fn set_poll(&self, params: PollParams) {
        self.adaptive.set(params);
    }

    /// The adaptive polling parameters.
    pub fn poll_params(&self) -> PollParams {
        self.adaptive.params()
    }

    /// The current adaptive poll time (how long the next blocking iteration may spin).
    pub fn poll_time(&self) -> Duration {
        self.adaptive.current()
    }

    /// For driving the reactor from a foreign event loop: announces that the caller is about
    /// to wait on [`as_raw_fd`](std::os::fd::AsRawFd::as_raw_fd), submits what is staged, and
    /// returns how long that wait may last (`Some(ZERO)`: work is pending, do not wait;
    /// `None`: no bound). While announced, the fd becomes readable when another thread
    /// schedules work (it writes the reactor's eventfd), when a registered fd is ready, and
    /// when the nearest timer is due (a timerfd, armed here), so a foreign loop may also just
    /// wait for readability. Then call [`poll(false)`](Self::poll), which ends the
    /// announcement and runs what is ready.
    ///
    /// ```
    /// use reactor::Reactor;
    /// use std::os::fd::AsRawFd;
    ///
    /// let r = Reactor::new()?;
    /// let h = r.handle();
    /// std::thread::spawn(move || h.oneshot(|r| r.stop()).unwrap());
    /// loop {
    ///     let t = r.prepare_external_wait();
    ///     let ms = t.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    ///     let mut pfd = libc::pollfd { fd: r.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    ///     // SAFETY: one valid pollfd.
    ///     unsafe { libc::poll(&mut pfd, 1, ms) };
    ///     r.poll(false);
    ///     if r.stop_requested() {
    ///         break;
    ///     }
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn prepare_external_wait(&self) -> Option<Duration> {
        self.end_external_wait();
        // The timerfd is registered first, so that on io_uring its poll goes to the kernel with
        // the rest of what is staged, just below.
        if let Err(e) = self.external_timer() {
            tracing::warn!(error = %e, "reactor: no timerfd for external waits; use the returned timeout");
        }
        if self.monitor.borrow_mut().need_wait() {
            if let Err(e) = self.wait(Some(Duration::ZERO)) {
                // Survived as `poll` does: the caller comes back after the pause (or sooner,
                // for work that is due) and the next `poll(false)` meets the monitor again.
                let pause = self.monitor_errors.failed(&e, self.backend());
                return Some(self.timeout().map_or(pause, |t| t.min(pause)));
            }
        }
        let t = self.timeout();
        if t == Some(Duration::ZERO) {
            return t;
        }
        if self.shared.notifier.prepare_block() {
            self.shared.notifier.finish_block();
            return Some(Duration::ZERO);
        }
        self.external_wait.set(true);
        // The reactor's fd becomes readable when the nearest timer is due, too.
        let target = t.map_or(u64::MAX, |d| {
            crate::sched::timer::ns_after(self.shared.clock.now_ns(), d)
        });
        if let Some(timer) = self.external_timer.borrow().as_ref() {
            timer.arm(t, target);
        }
        t
    }

    /// The timerfd of external waits, created and registered on first use.
    fn external_timer(&self) -> io::Result<std::cell::Ref<'_, ExternalTimer>> {
        if self.external_timer.borrow().is_none() {
            let timer = ExternalTimer::new()?;
            self.monitor.borrow_mut().update(
                timer.fd(),
                EXTERNAL_TIMER_TOKEN,
                0,
                libc::POLLIN as u32,
            )?;
            *self.external_timer.borrow_mut() = Some(timer);
        }
        Ok(std::cell::Ref::map(self.external_timer.borrow(), |t| {
            t.as_ref().expect("created above")
        }))
    }

    /// The timeout a blocking [`poll`](Self::poll) would wait for now (zero if work is
    /// pending, `None` if nothing bounds it), without announcing anything.
    pub fn next_timeout(&self) -> Option<Duration> {
        self.timeout()
    }

    /// Whether [`stop`](Self::stop) or [`Handle::stop`] was called since the last time
    /// [`run`](Self::run) returned or this returned `true` (the request is consumed), for loops
    /// that drive the reactor themselves.
    pub fn stop_requested(&self) -> bool {
        // Acquire: pairs with the release store in `stop`/`Handle::stop`.
        self.shared.stop.swap(false, Ordering::Acquire)
    }

    fn end_external_wait(&self) {
        if self.external_wait.replace(false) {
            self.shared.notifier.finish_block();
        }
    }

    /// The wait bound of a blocking poll: zero if work is pending, else the nearest timer or
    /// the idle-BH bound, else none.
    fn timeout(&self) -> Option<Duration> {
        if self.handlers.has_ready() || self.ops.has_queued() {
            return Some(Duration::ZERO);
        }
        let mut t = match self.bhs.peek(&self.shared.notifier.list) {
            Peek::Due => return Some(Duration::ZERO),
            Peek::Idle => Some(bh::IDLE_TIMEOUT),
            Peek::Nothing => None,
        };
        if let Some(deadline) = self.timers.next_deadline() {
            let left = Duration::from_nanos(deadline.saturating_sub(self.shared.clock.now_ns()));
            t = Some(t.map_or(left, |t| t.min(left)));
        }
        t
    }

    /// Polls (blocking) until [`stop`](Self::stop) or [`Handle::stop`] is called. The stop
    /// request is consumed, so `run` can be called again. Errors of the fd monitor are
    /// survived as [`poll`](Self::poll) says; [`try_run`](Self::try_run) returns them.
    pub fn run(&self) {
        // Acquire: pairs with the release store in `stop`/`Handle::stop`.
        while !self.shared.stop.swap(false, Ordering::Acquire) {
            self.poll(true);
        }
    }

    /// [`run`](Self::run) with [`try_poll`](Self::try_poll): returns the first error of the fd
    /// monitor (the stop request, if any, is left for the next `run`).
    ///
    /// ```
    /// let r = reactor::Reactor::new()?;
    /// r.handle().oneshot(|r| r.stop()).unwrap();
    /// r.try_run()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`try_poll`](Self::try_poll).
    pub fn try_run(&self) -> io::Result<()> {
        // Acquire: pairs with the release store in `stop`/`Handle::stop`.
        while !self.shared.stop.swap(false, Ordering::Acquire) {
            self.try_poll(true)?;
        }
        Ok(())
    }

    /// Polls (blocking) until `done()` returns `true`; checks it before every iteration.
    /// Errors of the fd monitor are survived as [`poll`](Self::poll) says.
    pub fn run_until(&self, mut done: impl FnMut() -> bool) {
        while !done() {
            self.poll(true);
        }
    }

    /// [`run_until`](Self::run_until) with [`try_poll`](Self::try_poll): returns the first
    /// error of the fd monitor.
    ///
    /// # Errors
    /// As [`try_poll`](Self::try_poll).
    pub fn try_run_until(&self, mut done: impl FnMut() -> bool) -> io::Result<()> {
        while !done() {
            self.try_poll(true)?;
        }
        Ok(())
    }

    /// Makes the next `count` waits of the fd monitor fail with `errno`, as if the kernel had
    /// returned it from `epoll_wait` or `io_uring_enter`: for fault tests of a daemon built on
    /// the reactor (and of the reactor itself). On io_uring, `EAGAIN` and `EBUSY` are first
    /// retried by the backend (each counts one wait), so a few of them never reach the loop.
    /// `count` 0 ends an injection.
    ///
    /// ```
    /// let r = reactor::Reactor::new()?;
    /// r.inject_monitor_errors(libc::EBADF, 1);
    /// assert!(r.try_poll(true).is_err());
    /// r.inject_monitor_errors(libc::EBADF, 1);
    /// r.handle().oneshot(|_| {}).unwrap();
    /// assert!(r.poll(true), "survived: the one-shot still ran");
    /// assert_eq!(r.stats().monitor_errors, 2);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn inject_monitor_errors(&self, errno: i32, count: u32) {
        self.monitor.borrow_mut().inject_errors(errno, count);
    }

    /// Asks [`run`](Self::run) to return after the current iteration.
    pub fn stop(&self) {
        // Release: pairs with the acquire swap in `run`.
        self.shared.stop.store(true, Ordering::Release);
    }

    /// Counters since the reactor was created.
    pub fn stats(&self) -> Stats {
        let (eventfd_writes, notify_skipped) = self.shared.notifier.counts();
        self.stats
            .snapshot(eventfd_writes, notify_skipped, self.monitor_errors.total())
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

/// `(st_dev, st_ino)` of `fd`'s file, failing like registering it with epoll would: `EBADF`
/// for a closed fd, `EPERM` for a regular file or directory.
fn file_identity(fd: RawFd) -> io::Result<(u64, u64)> {
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer for the duration of the call.
    crate::sys::cvt(unsafe { libc::fstat(fd, &mut st) })?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG | libc::S_IFDIR => Err(io::Error::from_raw_os_error(libc::EPERM)),
        _ => Ok((st.st_dev, st.st_ino)),
    }
}

impl std::os::fd::AsRawFd for Reactor {
    /// The fd a foreign loop waits on: readable while the reactor has something to report (see
    /// [`Reactor::prepare_external_wait`]). The epoll fd or the io_uring fd.
    fn as_raw_fd(&self) -> RawFd {
        self.monitor.borrow().raw_fd()
    }
}

impl std::os::fd::AsFd for Reactor {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the monitor's fd lives as long as the reactor, which outlives the borrow.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(self)) }
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        // Close the BH list first, so that nothing new arrives; then drop every callback here,
        // on the home thread. The fd monitor goes last (dropping it drops its registrations).
        self.quiesce_ops();
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
