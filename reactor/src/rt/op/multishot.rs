//! A stream's multishot receive ([`SocketIo::Multishot`]): one `RECV` with
//! `IORING_RECV_MULTISHOT` armed for as long as the application keeps reading, the kernel
//! picking a buffer from the reactor's provided-buffer ring for each arrival; reads copy out of
//! those buffers and give each back once read.
//!
//! Defined behaviour at the edges:
//! - **a peer that sends faster than the application reads**: once the stream holds
//!   `STREAM_BUFS` buffers unread, its receive is cancelled; data that completes meanwhile is
//!   kept; the socket's own buffer and the TCP window then hold the peer back, and the receive
//!   is armed again by the read that finds nothing left. No byte is lost, and the memory one
//!   stream holds is bounded.
//! - **every buffer of the ring held** (`ENOBUFS`, or none left when a read would arm the
//!   receive): that read receives straight into the caller's buffer instead (one single-shot
//!   receive, as [`SocketIo::Completion`] does), so a stream never waits on buffers that other
//!   streams hold; the next read arms the multishot receive again if buffers came back.
//! - **the stream dropped with data held or a receive in flight**: the buffers go back to the
//!   ring, the receive is cancelled, and what completes after that goes straight back too.
//!
//! [`SocketIo::Multishot`]: crate::net::SocketIo::Multishot
//! [`SocketIo::Completion`]: crate::net::SocketIo::Completion

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, types};

use crate::fd::ops::{Completion, OnComplete, OpCallback, OpId};
use crate::fd::recv_ring::{RECV_GROUP, RecvRing};
use crate::lockfree::sync::Arc;
use crate::reactor::recv_ring::STREAM_BUFS;
use crate::reactor::{Reactor, Shared};
use crate::sched::coop;

/// `IORING_CQE_F_BUFFER`: the completion names a provided buffer in its upper 16 bits.
const CQE_F_BUFFER: u32 = 1 << 0;
const CQE_BUFFER_SHIFT: u32 = 16;

/// What a socket's multishot operation does when its owner goes: cancel the operation and let
/// go of what it holds.
pub(crate) trait Close {
    fn close(&self);
}

/// A socket's multishot operation, if it has one (decided on first use), closed when the
/// socket goes.
pub(crate) struct CloseOnDrop<T: Close>(pub(crate) std::cell::OnceCell<Option<Rc<T>>>);

impl<T: Close> CloseOnDrop<T> {
    pub(crate) fn new() -> Self {
        CloseOnDrop(std::cell::OnceCell::new())
    }
}

impl<T: Close> Drop for CloseOnDrop<T> {
    fn drop(&mut self) {
        if let Some(Some(m)) = self.0.get() {
            m.close();
        }
    }
}

/// Whether one multishot operation is armed, and whether its cancellation was asked for.
#[derive(Default)]
pub(crate) struct Armed {
    id: Cell<Option<OpId>>,
    cancelling: Cell<bool>,
}

impl Armed {
    /// The armed operation, if any.
    pub(crate) fn id(&self) -> Option<OpId> {
        self.id.get()
    }

    /// `id` was just submitted.
    pub(crate) fn set(&self, id: OpId) {
        self.id.set(Some(id));
        self.cancelling.set(false);
    }

    /// A completion arrived; without `more`, the operation is over.
    pub(crate) fn completed(&self, more: bool) {
        if !more {
            self.id.set(None);
            self.cancelling.set(false);
        }
    }

    /// Asks the reactor owning `shared` to cancel the operation, once (from its thread, in or
    /// out of its poll).
    pub(crate) fn cancel(&self, shared: &Arc<Shared>) {
        let Some(id) = self.id.get() else { return };
        if self.cancelling.replace(true) {
            return;
        }
        Reactor::cancel_for(shared, id);
    }
}

/// Received bytes not yet read: `len` bytes of buffer `bid` from `off`.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    bid: u16,
    off: u32,
    len: u32,
}

/// The receive state of one stream, shared with the reactor while a receive is armed (it is
/// the operation's completion callback).
pub(crate) struct MultiRecv {
    ring: Rc<RecvRing>,
    shared: Arc<Shared>,
    fd: RawFd,
    chunks: RefCell<VecDeque<Chunk>>,
    /// The armed receive, if any.
    armed: Armed,
    eof: Cell<bool>,
    error: RefCell<Option<io::Error>>,
    waker: RefCell<Option<Waker>>,
    /// The stream is gone: whatever arrives goes straight back to the ring.
    closed: Cell<bool>,
}

impl MultiRecv {
    /// The receive state of the stream on `fd` (which the stream keeps open while it arms
    /// receives), on the reactor `r`.
    pub(crate) fn new(r: &Reactor, fd: RawFd) -> io::Result<Rc<MultiRecv>> {
        Ok(Rc::new(MultiRecv {
            ring: r.recv_ring()?,
            shared: r.shared().clone(),
            fd,
            chunks: RefCell::new(VecDeque::with_capacity(STREAM_BUFS + 2)),
            armed: Armed::default(),
            eof: Cell::new(false),
            error: RefCell::new(None),
            waker: RefCell::new(None),
            closed: Cell::new(false),
        }))
    }

    /// Reads into `dst`: what was received, else EOF (0) or the receive's error, else arms the
    /// receive (if it is not) and waits. `None`: the ring has no buffer left and no receive is
    /// armed, so the caller receives this read into `dst` itself (nothing else receives on the
    /// socket meanwhile, so the bytes stay in order).
    pub(crate) fn poll_read(
        self: &Rc<Self>,
        cx: &mut Context<'_>,
        dst: &mut [MaybeUninit<u8>],
    ) -> Option<Poll<io::Result<usize>>> {
        if dst.is_empty() {
            return Some(Poll::Ready(Ok(0)));
        }
        // What was received is read without waiting: only while the poll has budget left.
        if coop::poll_proceed(cx).is_pending() {
            return Some(Poll::Pending);
        }
        let n = self.copy_out(dst);
        if n > 0 {
            coop::spend(n);
            return Some(Poll::Ready(Ok(n)));
        }
        let error = self.error.borrow_mut().take();
        if let Some(e) = error {
            coop::spend(0);
            return Some(Poll::Ready(Err(e)));
        }
        if self.eof.get() {
            // (A task that reads on after the end gets it at once each time: it spends too.)
            coop::spend(0);
            return Some(Poll::Ready(Ok(0)));
        }
        if self.armed.id().is_none() {
            if self.ring.available() == 0 {
                return None;
            }
            if let Err(e) = self.arm() {
                return Some(Poll::Ready(Err(e)));
            }
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        Some(Poll::Pending)
    }

    /// Copies what was received into `dst` (from its start), giving back each buffer read to
    /// its end. Returns how many bytes it wrote.
    fn copy_out(&self, dst: &mut [MaybeUninit<u8>]) -> usize {
        let mut chunks = self.chunks.borrow_mut();
        let mut n = 0;
        while n < dst.len() {
            let Some(c) = chunks.front_mut() else { break };
            let k = (c.len as usize).min(dst.len() - n);
            // SAFETY: the buffer is out (delivered to this stream, not given back) and
            // `off..off + k` is within what its completion reported.
            let src = unsafe { self.ring.data(c.bid, c.off, k as u32) };
            // SAFETY: `src` has `k` bytes, `dst[n..]` room for at least `k`; the ring's memory
            // and the caller's do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst[n..].as_mut_ptr().cast(), k) };
            n += k;
            c.off += k as u32;
            c.len -= k as u32;
            if c.len == 0 {
                let bid = c.bid;
                chunks.pop_front();
                self.ring.give(bid);
            }
        }
        n
    }

    /// Arms the multishot receive on the reactor's ring.
    fn arm(self: &Rc<Self>) -> io::Result<()> {
        let sqe = opcode::RecvMulti::new(types::Fd(self.fd), RECV_GROUP).build();
        let callback = OpCallback::Shared(self.clone());
        let id = Reactor::with_current_for(&self.shared, |r| {
            r.count_recv_arm();
            // SAFETY: the receive writes only into buffers of the ring, which the reactor keeps
            // allocated until every operation is over; the stream keeps the fd open while it
            // arms receives, and cancels the receive when it goes.
            unsafe { r.submit_op(sqe, callback) }
        })
        .unwrap_or_else(|| Err(crate::io::no_reactor()))?;
        self.armed.set(id);
        Ok(())
    }

    /// The socket is leaving the reactor: cancels the receive, keeping what already arrived.
    pub(crate) fn close_receive(&self) {
        self.armed.cancel(&self.shared);
    }

    /// Whether a receive is armed (or being cancelled).
    pub(crate) fn armed(&self) -> bool {
        self.armed.id().is_some()
    }

    /// Whether received bytes are waiting to be read.
    pub(crate) fn has_unread(&self) -> bool {
        !self.chunks.borrow().is_empty()
    }
}

impl Close for MultiRecv {
    /// The stream is going: gives back what it holds and cancels its receive.
    fn close(&self) {
        self.closed.set(true);
        for c in self.chunks.borrow_mut().drain(..) {
            self.ring.give(c.bid);
        }
        self.armed.cancel(&self.shared);
    }
}

impl OnComplete for MultiRecv {
    fn on_complete(&self, _: &Reactor, c: Completion) {
        self.armed.completed(c.more());
        if c.flags & CQE_F_BUFFER != 0 {
            let bid = (c.flags >> CQE_BUFFER_SHIFT) as u16;
            self.ring.took(bid);
            if self.closed.get() || c.result <= 0 {
                self.ring.give(bid);
            } else {
                self.chunks.borrow_mut().push_back(Chunk {
                    bid,
                    off: 0,
                    len: c.result as u32,
                });
                if self.chunks.borrow().len() >= STREAM_BUFS && c.more() {
                    // Back-pressure: stop receiving until the application reads.
                    self.armed.cancel(&self.shared);
                }
            }
        } else if c.result == 0 {
            self.eof.set(true);
        } else if c.result < 0 {
            match -c.result {
                // The receive stopped (all buffers held, or cancelled): the next read arms it
                // again, or receives into its own buffer while the ring has none.
                libc::ENOBUFS | libc::ECANCELED => {}
                errno if !self.closed.get() => {
                    *self.error.borrow_mut() = Some(io::Error::from_raw_os_error(errno));
                }
                _ => {}
            }
        }
        let w = self.waker.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }
}
