//! [`Builder`]: a reactor's settings, and [`SocketIo`], how its sockets do I/O.

use std::io;

use super::*;
use crate::lockfree::event_notifier::EventNotifier;

/// How sockets do their owned-buffer I/O and `accept` on the io_uring backend.
///
/// Chosen by measurement (the bench's `tcp-echo` scenario: 64 loopback connections, one
/// request in flight each, a raw epoll client on the other core; the server thread is
/// saturated, so its CPU time per request is the figure that decides). Four runs of 5–7 of
/// `cargo run --release -p bench -- --scenario tcp-echo --runs 7` (rows `reactor-uring`,
/// `reactor-uring-readiness` and `reactor-uring-multishot`):
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
/// and [`Multishot`](SocketIo::Multishot) remain selectable. On epoll all three mean
/// readiness.
///
/// `Multishot` did not beat `Completion` on request/response (server CPU per request, four
/// runs each, same runs): 64 B 3.7–4.9 µs vs 3.6–4.8 µs, 1 KiB 4.1–5.3 µs vs 4.3–5.0 µs,
/// 1,000 connections 5.6–5.9 µs vs 5.7–6.4 µs; and it cost more on 64 KiB messages (a 4 KiB
/// provided buffer per completion, then a copy: 46 µs vs 32 µs per message). It saves the
/// per-read SQE and op state, not the kernel's TCP work, which dominates here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SocketIo {
    /// Readiness (a poll on the fd) and non-blocking system calls, on both backends.
    Readiness,
    /// io_uring `RECV`/`SEND`/`ACCEPT` operations (readiness on epoll).
    #[default]
    Completion,
    /// As `Completion`, except that a stream receives through one multishot `RECV` armed for
    /// as long as it is read, into the reactor's ring of provided buffers (512 buffers of
    /// 4 KiB, registered on first use; Linux 5.19+); reads copy out of those buffers. A stream
    /// holds at most 8 buffers of the ring unread, whatever the scheduler does: its receive
    /// ends by itself at that share (a byte limit, Linux 6.17+; on older kernels it is
    /// cancelled), what the kernel delivers beyond it is copied into the stream's own memory
    /// and the buffer given back at once (`Stats::recv_bytes_copied`), and the socket's own
    /// buffer takes over until the application reads. When every buffer is held, a read
    /// receives into its own buffer instead. A listener accepts through one multishot `ACCEPT` the same way, queueing at most
    /// 64 connections ahead of the application. Readiness on epoll.
    ///
    /// ```
    /// use reactor::{Reactor, net::{SocketIo, UnixStream}};
    /// let r = Reactor::builder().socket_io(SocketIo::Multishot).build()?;
    /// r.block_on(async {
    ///     let (a, b) = UnixStream::pair()?;
    ///     let (res, _) = a.write_all(b"ping".to_vec()).await;
    ///     res?;
    ///     let (n, buf) = b.read(Vec::with_capacity(16)).await;
    ///     assert_eq!(&buf[..n?], b"ping");
    ///     Ok::<(), std::io::Error>(())
    /// })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    Multishot,
}

/// How other threads wake a sleeping reactor (see [`Builder::wakeup`]).
///
/// Whichever is chosen, a wakeup is sent only when the reactor may be asleep (the
/// `notify_me` protocol); a busy reactor is never sent one.
///
/// ```
/// use reactor::{Backend, Reactor, Wakeup};
/// let r = Reactor::new()?;
/// let h = r.handle();
/// std::thread::spawn(move || h.oneshot(|r| r.stop()).unwrap());
/// r.run(); // woken from the other thread by whichever doorbell `r.wakeup()` names
/// let st = r.stats();
/// if r.wakeup() == Wakeup::EventFd {
///     assert_eq!(st.ring_messages, 0);
/// } else {
///     assert_eq!(r.backend(), Backend::Uring);
///     assert_eq!(st.eventfd_writes, 0);
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wakeup {
    /// A ring message (a completion posted into the reactor's ring with
    /// `IORING_REGISTER_SEND_MSG_RING`) on the io_uring backend where the kernel has it (Linux
    /// 6.13); the eventfd otherwise (epoll, older kernels) and if a message cannot be sent.
    #[default]
    Auto,
    /// Always the eventfd the reactor's monitor watches (one write by the waker; on io_uring a
    /// poll wakeup and a read by the woken thread too).
    EventFd,
}

/// Default submission-queue size of the io_uring backend.
pub const DEFAULT_URING_ENTRIES: u32 = 256;

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
    sqe128: bool,
    task_budget: u32,
    io_budget: u32,
    pool: Option<ThreadPool>,
    socket_io: SocketIo,
    poll: Option<PollParams>,
    poll_stand_down: bool,
    wakeup: Wakeup,
    max_ops: usize,
}

/// Default number of task polls per iteration (see [`Builder::task_budget`]).
pub const DEFAULT_TASK_BUDGET: u32 = 256;

/// Default most [`Reactor::submit_sqe`] operations in flight at once (see
/// [`Builder::max_sqes_in_flight`]).
pub const DEFAULT_MAX_SQES_IN_FLIGHT: usize = 1 << 16;

impl Default for Builder {
    fn default() -> Self {
        Builder {
            backend: Backend::Auto,
            uring_entries: DEFAULT_URING_ENTRIES,
            sqe128: false,
            task_budget: DEFAULT_TASK_BUDGET,
            io_budget: crate::sched::coop::DEFAULT_IO_BUDGET,
            pool: None,
            socket_io: SocketIo::default(),
            poll: None,
            poll_stand_down: true,
            wakeup: Wakeup::Auto,
            max_ops: DEFAULT_MAX_SQES_IN_FLIGHT,
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

    /// Gives the io_uring backend a ring of 128-byte SQEs (`IORING_SETUP_SQE128`, Linux 5.19),
    /// so that [`Reactor::submit_sqe128`] can submit `IORING_OP_URING_CMD` commands with up to
    /// 80 bytes of payload (`opcode::UringCmd80`): FUSE over io_uring's ring entries, NVMe
    /// passthrough, ublk. Everything else works as on a ring of 64-byte SQEs; the ring's
    /// submission queue takes twice the memory. Default `false`, and a reactor that does not
    /// ask pays nothing for it: its ring is built and driven exactly as before. No effect on
    /// epoll (where `submit_sqe128` is `Unsupported`, like every ring operation).
    ///
    /// ```
    /// use reactor::{Backend, Builder};
    /// if let Ok(r) = Builder::new().backend(Backend::Uring).sqe128(true).build() {
    ///     assert!(r.sqe128());
    /// }
    /// // (Each backend where it is built.)
    /// if let Ok(r) = Builder::new().backend(Backend::Epoll).sqe128(true).build() {
    ///     assert!(!r.sqe128()); // epoll has no ring
    /// }
    /// ```
    pub fn sqe128(mut self, on: bool) -> Self {
        self.sqe128 = on;
        self
    }

    /// Most task polls per iteration (at least 1). Tasks woken beyond it wait for the next
    /// iteration, after fd handlers and timers have had their turn.
    pub fn task_budget(mut self, polls: u32) -> Self {
        self.task_budget = polls.max(1);
        self
    }

    /// Most I/O operations one poll of a task (or of `block_on`'s future) may complete (at
    /// least 1; default [`DEFAULT_IO_BUDGET`](crate::DEFAULT_IO_BUDGET)): file reads the page
    /// cache serves, inline writes, socket reads and writes that find the socket ready,
    /// accepted connections already queued. The next one yields first, so that a task copying
    /// a cached file or draining a busy socket lets fd handlers, timers and other tasks run in
    /// between ([`Stats::io_budget_yields`](crate::Stats::io_budget_yields)). Operations that
    /// wait (on the ring, the thread pool or readiness) spend nothing. One that moved 64 KiB or
    /// more counts once more per full 64 KiB (except through `Async::read_with`/`write_with`,
    /// whose closure's result is not a length), so with the default a poll copies about 4 MiB,
    /// plus what its last operation moves.
    ///
    /// ```
    /// use reactor::{Async, Reactor};
    /// use std::io::{Read, Write};
    /// use std::os::unix::net::UnixStream;
    ///
    /// let r = Reactor::builder().io_budget(2).build()?;
    /// let (a, b) = UnixStream::pair()?;
    /// (&a).write_all(b"abc")?;
    /// r.block_on(async move {
    ///     let b = Async::new(b).unwrap();
    ///     for _ in 0..3 {
    ///         // Each read finds a byte waiting; the third one in a poll yields first.
    ///         let mut byte = [0u8];
    ///         assert_eq!(b.read_with(|s| (&*s).read(&mut byte)).await.unwrap(), 1);
    ///     }
    /// });
    /// assert_eq!(r.stats().io_budget_yields, 1);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn io_budget(mut self, ops: u32) -> Self {
        self.io_budget = ops.max(1);
        self
    }

    /// Most operations submitted with [`Reactor::submit_sqe`] in flight at once on this
    /// reactor (at least 1; default [`DEFAULT_MAX_SQES_IN_FLIGHT`], 65,536): each holds its
    /// callback (and the kernel's request) until its completion has been dispatched, so a
    /// burst of submissions from user code that never lets the loop run stops here, with
    /// `WouldBlock`, instead of growing memory without bound. The runtime's own operations
    /// (file I/O, socket operations by completion, multishot receives) are not counted: each
    /// belongs to a future the application holds, and some (a receive on an idle connection)
    /// wait indefinitely, which must not keep others out. All operations wait, instead, while
    /// the ring's submission queue and its backlog are full (the kernel busy): the runtime's
    /// until the next wait submits the backlog
    /// ([`Stats::op_room_waits`](crate::Stats::op_room_waits)), `submit_sqe` with
    /// `WouldBlock`.
    ///
    /// ```
    /// use reactor::{Reactor, io_uring::opcode};
    /// let r = Reactor::builder().max_sqes_in_flight(2).build()?;
    /// // SAFETY (each): a NOP refers to no memory.
    /// let submit = || unsafe { r.submit_sqe(opcode::Nop::new().build(), |_, _| {}) };
    /// if submit().is_ok() {
    ///     submit()?;
    ///     let third = submit().unwrap_err();
    ///     assert_eq!(third.kind(), std::io::ErrorKind::WouldBlock);
    ///     while r.ops_in_flight() > 0 {
    ///         r.poll(true); // completions dispatched: room again
    ///     }
    ///     submit()?;
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn max_sqes_in_flight(mut self, ops: usize) -> Self {
        self.max_ops = ops.max(1);
        self
    }

    /// The thread pool for blocking work ([`spawn_blocking`](crate::spawn_blocking), file I/O
    /// on epoll). Default: the process-wide [`ThreadPool::default_pool`].
    pub fn thread_pool(mut self, pool: ThreadPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// How other threads wake the reactor when it sleeps (see [`Wakeup`]; the one in use is
    /// [`Reactor::wakeup`]).
    ///
    /// ```
    /// use reactor::{Builder, Wakeup};
    /// let r = Builder::new().wakeup(Wakeup::EventFd).build()?;
    /// assert_eq!(r.wakeup(), Wakeup::EventFd);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn wakeup(mut self, wakeup: Wakeup) -> Self {
        self.wakeup = wakeup;
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

    /// Whether busy polling stands down while the loop's thread waits for a CPU (default
    /// `true`; see [`Reactor::set_poll_stand_down`](crate::Reactor::set_poll_stand_down)).
    ///
    /// ```
    /// use reactor::{Builder, PollParams};
    /// let r = Builder::new().poll(PollParams::IOTHREAD).poll_stand_down(false).build()?;
    /// assert!(!r.poll_stand_down());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn poll_stand_down(mut self, on: bool) -> Self {
        self.poll_stand_down = on;
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
        // The eventfd first: with the fd limit reached it fails with a plain EMFILE.
        let eventfd = EventNotifier::new()?;
        let ring = RingShape {
            entries: self.uring_entries,
            sqe128: self.sqe128,
        };
        let mut monitor = Monitor::open(self.backend, ring)?;
        // Last, and optional (a kernel before 6.13 has none).
        let doorbell = match self.wakeup {
            // Unsupported (epoll, a kernel before 6.13): the eventfd it is.
            Wakeup::Auto => monitor
                .doorbell()
                .ok()
                .map(|d| Box::new(d) as Box<dyn notify::MessageBell>),
            Wakeup::EventFd => None,
        };
        let shared = Arc::new(Remote {
            notifier: notify::new(eventfd, doorbell),
            clock: Clock::new(),
            stop: AtomicBool::new(false),
        });
        monitor.update(shared.notifier.fd(), NOTIFIER_TOKEN, 0, libc::POLLIN as u32)?;
        let kind = monitor.kind();
        let r = Reactor {
            shared,
            monitor: RefCell::new(monitor),
            bhs: BhHome::new(),
            timers: Timers::new(),
            handlers: Handlers::new(),
            ops: Ops::new(self.max_ops),
            birth: super::fork::Birth::now(),
            depth: Cell::new(0),
            task_budget: self.task_budget,
            io_budget: crate::sched::coop::Budget::new(self.io_budget),
            pool: self.pool.unwrap_or_else(ThreadPool::default_pool),
            socket_io: self.socket_io,
            socket_path: match (kind, self.socket_io) {
                (Backend::Uring, SocketIo::Completion) => SocketPath::Completion,
                (Backend::Uring, SocketIo::Multishot) => SocketPath::Multishot,
                _ => SocketPath::Readiness,
            },
            spin: super::spin::Spin::new(
                self.poll.unwrap_or(PollParams::OFF),
                self.poll_stand_down,
            ),
            external_wait: Cell::new(false),
            external_timer: RefCell::new(None),
            stats: LocalStats::default(),
            monitor_errors: MonitorErrors::default(),
            fixed_buffers: RefCell::new(None),
            recv_ring: RefCell::new(None),
            _not_send: PhantomData,
        };
        Ok(r)
    }
}
