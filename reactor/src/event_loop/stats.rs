//! [`Stats`]: what a reactor counts.

use std::cell::Cell;

/// Counters of a reactor since its creation, from [`Reactor::stats`](crate::Reactor::stats).
///
/// ```
/// let r = reactor::Reactor::new()?;
/// r.poll(false);
/// assert_eq!(r.stats().iterations, 1);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Calls to `poll` (nested ones included).
    pub iterations: u64,
    /// Iterations that waited with a non-zero timeout.
    pub blocking_waits: u64,
    /// Notifications (from any thread) that wrote the eventfd because the reactor might sleep.
    pub eventfd_writes: u64,
    /// Notifications that woke the reactor with a ring message instead (see
    /// [`Wakeup`](crate::Wakeup)).
    pub ring_messages: u64,
    /// Notifications that skipped the eventfd because the reactor was awake: no system call.
    pub notify_skipped: u64,
    /// BH and one-shot callbacks run.
    pub bh_runs: u64,
    /// Task polls.
    pub task_polls: u64,
    /// fd callbacks run.
    pub fd_dispatches: u64,
    /// Timer callbacks run.
    pub timers_fired: u64,
    /// Busy polls that found work (adaptive polling).
    pub poll_hits: u64,
    /// Busy polls that spun their whole window and then waited.
    pub poll_misses: u64,
    /// Times busy polling gave its CPU away for a moment (`sched_yield`, every 2 µs of a
    /// spin, and at the start of a spin once a yield has run another thread), so that a
    /// thread sharing the CPU is not kept waiting for the whole window.
    pub poll_yields: u64,
    /// Spins cut short because the loop shares its CPU: a yield had run another thread, so
    /// the next spin yields first, looks once, and then waits rather than spinning on (see
    /// [`PollParams`](crate::PollParams)).
    pub poll_shared: u64,
    /// Blocking iterations that did not busy-poll because the loop's thread had spent over a
    /// tenth of the last few milliseconds waiting for a CPU (see
    /// [`PollParams`](crate::PollParams)).
    pub poll_contended: u64,
    /// Waits of the fd monitor that failed with an OS error after the backend's own retries
    /// (see [`Reactor::poll`](crate::Reactor::poll) for what the loop does then).
    pub monitor_errors: u64,
    /// File reads and writes completed on the loop thread instead of going to the ring
    /// (io_uring) or the thread pool: by their non-blocking form (`RWF_NOWAIT`: served by the
    /// page cache, or failed with an error the blocking call would give too), or, for small
    /// buffered writes the file system cannot make without blocking, by the blocking call
    /// while such writes are fast (see
    /// [`File::set_inline_writes`](crate::fs::File::set_inline_writes)).
    pub inline_io: u64,
    /// Buffered writes made on the loop thread (counted in `inline_io`) that took long enough
    /// to have waited for something: dirty-page throttling, the journal, reclaim, the inode's
    /// lock, or a preemption. Each turns inline writes off for its file until its writes on the
    /// thread pool are fast again (see [`File::set_inline_writes`](crate::fs::File::set_inline_writes)).
    pub inline_write_stalls: u64,
    /// I/O operations that yielded to the loop before they started, because the task (or
    /// `block_on`'s future) had already spent its I/O budget in this poll (see
    /// [`Builder::io_budget`](crate::Builder::io_budget)).
    pub io_budget_yields: u64,
    /// Multishot receives armed ([`SocketIo::Multishot`](crate::net::SocketIo::Multishot)):
    /// one per stream while the application keeps up; more when back-pressure or a ring with
    /// every buffer held stopped one and a read armed it again.
    pub recv_arms: u64,
    /// Buffers of the receive ring held by streams now (received, not yet read).
    pub recv_buffers_held: u64,
    /// Times a runtime io_uring operation waited before it was submitted because the ring's
    /// submission queue and its backlog were full (the kernel busy; see
    /// [`Builder::max_sqes_in_flight`](crate::Builder::max_sqes_in_flight)).
    pub op_room_waits: u64,
    /// Bytes of multishot receives copied out of the receive ring into their stream's own
    /// memory, because the stream already held its share of the ring when they arrived (the
    /// kernel received for it before the loop could stop it).
    pub recv_bytes_copied: u64,
}

impl Stats {
    /// Wakeups sent to the reactor because it might sleep, by either doorbell
    /// (`eventfd_writes + ring_messages`): one system call each, by the waker.
    ///
    /// ```
    /// let r = reactor::Reactor::new()?;
    /// r.poll(false);
    /// assert_eq!(r.stats().wakeups(), 0, "nobody had to wake it");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn wakeups(&self) -> u64 {
        self.eventfd_writes + self.ring_messages
    }
}

/// The home thread's counters.
#[derive(Debug, Default)]
pub(crate) struct LocalStats {
    pub(crate) iterations: Cell<u64>,
    pub(crate) blocking_waits: Cell<u64>,
    pub(crate) bh_runs: Cell<u64>,
    pub(crate) task_polls: Cell<u64>,
    pub(crate) fd_dispatches: Cell<u64>,
    pub(crate) timers_fired: Cell<u64>,
    pub(crate) poll_hits: Cell<u64>,
    pub(crate) poll_misses: Cell<u64>,
    pub(crate) poll_yields: Cell<u64>,
    pub(crate) poll_shared: Cell<u64>,
    pub(crate) poll_contended: Cell<u64>,
    pub(crate) inline_io: Cell<u64>,
    pub(crate) inline_write_stalls: Cell<u64>,
    pub(crate) io_budget_yields: Cell<u64>,
    pub(crate) recv_arms: Cell<u64>,
    pub(crate) recv_bytes_copied: Cell<u64>,
    pub(crate) op_room_waits: Cell<u64>,
}

impl LocalStats {
    pub(crate) fn snapshot(
        &self,
        eventfd_writes: u64,
        notify_skipped: u64,
        monitor_errors: u64,
    ) -> Stats {
        Stats {
            iterations: self.iterations.get(),
            blocking_waits: self.blocking_waits.get(),
            eventfd_writes,
            ring_messages: 0,
            notify_skipped,
            bh_runs: self.bh_runs.get(),
            task_polls: self.task_polls.get(),
            fd_dispatches: self.fd_dispatches.get(),
            timers_fired: self.timers_fired.get(),
            poll_hits: self.poll_hits.get(),
            poll_misses: self.poll_misses.get(),
            poll_yields: self.poll_yields.get(),
            poll_shared: self.poll_shared.get(),
            poll_contended: self.poll_contended.get(),
            monitor_errors,
            inline_io: self.inline_io.get(),
            inline_write_stalls: self.inline_write_stalls.get(),
            io_budget_yields: self.io_budget_yields.get(),
            recv_arms: self.recv_arms.get(),
            recv_buffers_held: 0,
            recv_bytes_copied: self.recv_bytes_copied.get(),
            op_room_waits: self.op_room_waits.get(),
        }
    }
}
