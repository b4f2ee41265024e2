//! One type per I/O operation, and the two ways to run one.
//!
//! An operation ([`Op`]) owns what the kernel reads or writes (buffers, the fd's keeper, a
//! path) and says once how to describe itself to io_uring ([`Op::sqe`]) and how to make the
//! system call itself ([`Op::call`]). Files and sockets (`fs.rs`, `net/`) only build
//! operations and hand them to a driver; the drivers here are the only code in the async
//! layer that chooses a path (for sockets, from `Reactor::socket_path`, the backend and
//! socket mode resolved once when the reactor was built):
//!
//! - [`run`] (files): what the page cache can serve at once, and small buffered writes while
//!   they are fast (`inline_writes.rs`), on the loop thread; the rest an io_uring operation
//!   on the uring backend, the blocking call on the reactor's thread pool on epoll;
//! - [`run_when_ready`] (sockets): an io_uring operation when the reactor does socket I/O by
//!   completion ([`SocketIo::Completion`](crate::net::SocketIo) or `Multishot` on io_uring);
//!   otherwise the non-blocking call, made when the socket is ready;
//! - `multishot.rs` (stream reads under `SocketIo::Multishot` on io_uring): one multishot
//!   receive per stream into the reactor's provided-buffer ring.
//!
//! Both `run` and `run_when_ready` take the io_uring path through [`run_on_ring`], at the end
//! of this file. A new operation is one new type in `file.rs` (plain reads and writes),
//! `file_buffers.rs` (other buffer shapes), `file_meta.rs` (no data) or `socket.rs`.

pub(crate) mod file;
pub(crate) mod file_buffers;
pub(crate) mod file_meta;
pub(crate) mod in_order;
pub(crate) mod inline_writes;
pub(crate) mod multishot;
pub(crate) mod multishot_accept;
pub(crate) mod socket;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::squeue::Entry;

use crate::event_loop::{Reactor, Remote, SocketPath};
use crate::fd::backend::Backend;
use crate::fd::ops::{Completion, OnComplete, OpCallback, OpId};
use crate::io::Async;
use crate::lockfree::sync::Arc;
use crate::rt::blocking::{spawn_blocking, spawn_blocking_in};
use crate::rt::budget;
use crate::rt::no_reactor;
use crate::sched::lane::Lane;

/// One I/O operation with everything it needs.
///
/// # Safety
/// The SQE [`sqe`](Op::sqe) builds, and the system call [`call`](Op::call) makes, must refer
/// only to memory that `self` owns and that stays where it is when `self` moves (a `Vec`'s or
/// a `Box`'s heap block, what an `Arc` or `Rc` points to), or to memory that outlives the
/// operation; and every fd they name must be kept open by `self`. The io_uring driver keeps
/// `self` alive until the kernel has completed the SQE, even when the caller's future is
/// dropped first.
pub(crate) unsafe trait Op: 'static {
    /// What the caller gets: typically the result with the resources handed back.
    type Output;

    /// The io_uring SQE of this operation (its `user_data` is the reactor's to set).
    fn sqe(&mut self) -> Entry;

    /// The system call: blocking for files (run on the thread pool), non-blocking for sockets
    /// (run when the socket is ready). Returns the kernel's non-negative result.
    fn call(&mut self) -> io::Result<usize>;

    /// The call made without blocking, where the operation has such a form (`RWF_NOWAIT`
    /// reads and writes served by the page cache): its result, or `None` when only the
    /// blocking [`call`](Op::call) or the ring can do it. Both backends try it on the loop
    /// thread before they hand the operation to the ring or the thread pool.
    fn call_nowait(&mut self) -> Option<io::Result<usize>> {
        None
    }

    /// The blocking [`call`](Op::call), made on the loop thread because it is expected to be
    /// short: a small buffered write while the file's writes are fast (`inline_writes.rs`).
    /// Its result, or `None` when the operation goes to the ring or the thread pool. Tried
    /// after [`call_nowait`](Op::call_nowait).
    fn call_inline(&mut self) -> Option<io::Result<usize>> {
        None
    }

    /// Whether the reactor's thread pool runs this operation better than io_uring on the uring
    /// backend: a buffered write that the file system cannot do without blocking, which
    /// io_uring would hand to an io-wq worker, one write of the file at a time (measured in
    /// the bench's `file-write` scenario).
    fn prefers_pool(&self) -> bool {
        false
    }

    /// The lane of the thread pool this operation runs in when it goes to the pool, if its
    /// kind must not run beside others of the same file (buffered writes: see
    /// `sched/lane.rs`); `None` runs it on any free pool thread.
    fn pool_lane(&self) -> Option<&Lane> {
        None
    }

    /// Whether a successful [`call`](Op::call) that returned `n` left nothing more to take
    /// (a receive shorter than its room: the socket's queue was drained). Readiness then
    /// waits for the next event before the next call instead of trying first, which on a
    /// request/response connection saves a system call that would fail with `EAGAIN`.
    fn drained(&self, n: usize) -> bool {
        let _ = n;
        false
    }

    /// How many bytes a successful call that returned `n` moved, for the task's I/O budget
    /// (`sched/coop.rs`): `n` for reads and writes, 0 where `n` is not a length (an fd).
    fn moved(&self, n: usize) -> usize {
        n
    }

    /// The caller's output from the kernel's result (from either backend).
    fn complete(self, res: io::Result<usize>) -> Self::Output;

    /// Disposes of what the operation produced when nobody collects it (its future was dropped
    /// after the kernel completed it): an `open` or `accept` closes the fd `result` names.
    fn orphan(self, result: usize)
    where
        Self: Sized,
    {
        let _ = result;
    }
}

/// An io_uring length: a buffer larger than 4 GiB is read or written in part (a short
/// transfer), as a system call may also do.
fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// The backend of the reactor polling on this thread.
fn backend() -> io::Result<Backend> {
    Reactor::with_current(|r| r.backend()).ok_or_else(no_reactor)
}

/// Runs a file operation: first its non-blocking form on the loop thread, if it has one and
/// the page cache can serve it (`RWF_NOWAIT`: one system call, no ring entry and no thread
/// hand-over), or its blocking call there if it is a small buffered write expected to be fast
/// ([`Op::call_inline`]); otherwise on the io_uring backend an io_uring operation (unless it
/// [prefers the pool](Op::prefers_pool)), and on epoll the blocking call on the reactor's
/// thread pool, where the output is also made, so that what an uncollected operation produced
/// (an opened fd) is dropped there, not leaked.
pub(crate) async fn run<O: Op + Send>(op: O) -> O::Output
where
    O::Output: Send,
{
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => return op.complete(Err(e)),
    };
    let mut op = op;
    // It may complete here, inside the task's poll: only while the poll has budget left.
    budget::proceed().await;
    if let Some(res) = op.call_nowait().or_else(|| op.call_inline()) {
        Reactor::with_current(|r| r.count_inline_io());
        budget::spend(res.as_ref().map_or(0, |&n| op.moved(n)));
        return op.complete(res);
    }
    if backend == Backend::Uring && !op.prefers_pool() {
        return run_on_ring(op).await;
    }
    let lane = op.pool_lane().cloned();
    // The lane is busy (no inline writes to the file) until the call is done, not until the
    // task has the result: the task's next write must find it idle.
    let pending = lane.as_ref().map(Lane::pending);
    let work = move || {
        let res = op.call();
        drop(pending);
        op.complete(res)
    };
    let job = match lane {
        Some(lane) => spawn_blocking_in(&lane, work),
        None => spawn_blocking(work),
    };
    job.await.unwrap_or_else(|e| match e.into_panic() {
        Some(p) => std::panic::resume_unwind(p),
        None => unreachable!("blocking work is never cancelled"),
    })
}

/// Which readiness a socket operation waits for when it runs by readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ready {
    Read,
    Write,
}

/// Runs a socket operation on `io`: an io_uring operation when the current reactor does
/// socket I/O by completion, else the non-blocking call each time `io` is ready for `ready`,
/// until it does not return `WouldBlock`.
pub(crate) async fn run_when_ready<O: Op, T: AsFd>(
    io: &Async<T>,
    ready: Ready,
    op: O,
) -> O::Output {
    let completion = Reactor::with_current(|r| r.socket_path() != SocketPath::Readiness);
    match completion {
        Some(true) => run_on_ring(op).await,
        Some(false) => {
            let mut op = op;
            let res = match ready {
                Ready::Read => {
                    let res = io.read_with(|_| op.call()).await;
                    if res.as_ref().is_ok_and(|&n| op.drained(n)) {
                        io.clear_read_ready();
                    }
                    res
                }
                Ready::Write => io.write_with(|_| op.call()).await,
            };
            // The size of what it moved, beyond the one unit `read_with`/`write_with` spent.
            budget::spend_bytes(res.as_ref().map_or(0, |&n| op.moved(n)));
            op.complete(res)
        }
        None => op.complete(Err(no_reactor())),
    }
}

// The io_uring path of an operation.
//
// The io_uring path of an [`Op`]: [`run`], and the future it awaits.
//
// The operation (its buffers, the fd's keeper, a path) moves into a state shared with the
// reactor before its SQE is built, and comes back with the completion. That state is also the
// operation's completion callback, so an operation costs one allocation. If the future is
// dropped first, the operation is cancelled (`ASYNC_CANCEL`, at once inside the reactor's
// poll, else at its next iteration) and stays in the state until the completion arrives; then
// [`Op::orphan`] disposes of what it produced (closes the fd an accept or open returned) or
// keeps it where its owner finds it (bytes a stream's receive took, `in_order.rs`).

struct State<O> {
    done: Cell<Option<Completion>>,
    waker: RefCell<Option<Waker>>,
    op: RefCell<Option<O>>,
    abandoned: Cell<bool>,
}

impl<O: Op> State<O> {
    /// Disposes of the operation, and of what it produced, when nobody will collect it.
    fn orphan(&self, c: Completion) {
        let op = self.op.borrow_mut().take();
        if let Some(op) = op {
            if c.result >= 0 {
                op.orphan(c.result as usize);
            }
        }
    }
}

impl<O: Op> OnComplete for State<O> {
    fn on_complete(&self, _: &Reactor, c: Completion) {
        if self.abandoned.get() {
            self.orphan(c);
            return;
        }
        self.done.set(Some(c));
        let w = self.waker.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// The future of one submitted operation: its completion, with the operation back.
struct Submitted<O: Op> {
    state: Rc<State<O>>,
    id: OpId,
    shared: Arc<Remote>,
    finished: bool,
}

impl<O: Op> Future for Submitted<O> {
    type Output = (Completion, O);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.state.done.take() {
            Some(c) => {
                self.finished = true;
                let op = self
                    .state
                    .op
                    .borrow_mut()
                    .take()
                    .expect("the operation comes back once");
                Poll::Ready((c, op))
            }
            None => {
                *self.state.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<O: Op> Drop for Submitted<O> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(c) = self.state.done.take() {
            // Completed but never collected: dispose of what it produced.
            self.state.orphan(c);
            return;
        }
        self.state.abandoned.set(true);
        // Cancel it (off the reactor's poll, at its next iteration); the state disposes of
        // the operation when the completion arrives.
        Reactor::cancel_for(&self.shared, self.id);
    }
}

/// Runs `op` as an io_uring operation on the current reactor's ring.
async fn run_on_ring<O: Op>(op: O) -> O::Output {
    let state = Rc::new(State {
        done: Cell::new(None),
        waker: RefCell::new(None),
        op: RefCell::new(Some(op)),
        abandoned: Cell::new(false),
    });
    // Built where the operation now stays until its completion.
    let sqe = state.op.borrow_mut().as_mut().expect("just stored").sqe();
    let submitted = loop {
        // At the reactor's bound of operations in flight (or with its ring's queue full):
        // wait for room (one completes, the queue is submitted), then submit.
        let room = std::future::poll_fn(|cx| {
            Reactor::with_current(|r| r.poll_op_room(cx)).unwrap_or(std::task::Poll::Ready(()))
        });
        room.await;
        let callback = OpCallback::Shared(state.clone());
        let res = Reactor::with_current(|r| {
            // SAFETY: `Op`'s contract: the SQE refers only to what the operation owns (stable
            // when moved) or to memory that outlives it, and the reactor holds the state,
            // hence the operation, until the final completion.
            unsafe { r.submit_op(sqe.clone(), callback) }.map(|id| (id, r.shared().clone()))
        })
        .unwrap_or_else(|| Err(no_reactor()));
        match res {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            res => break res,
        }
    };
    match submitted {
        Ok((id, shared)) => {
            let fut = Submitted {
                state,
                id,
                shared,
                finished: false,
            };
            let (c, op) = fut.await;
            op.complete(c.into_result().map(|n| n as usize))
        }
        Err(e) => {
            // Not submitted: the reactor kept no share of the state.
            let op = state.op.borrow_mut().take().expect("not taken");
            op.complete(Err(e))
        }
    }
}
