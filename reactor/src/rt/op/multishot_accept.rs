//! A listener's multishot accept ([`SocketIo::Multishot`]): one `ACCEPT` with
//! `IORING_ACCEPT_MULTISHOT` armed while the application accepts, each connection completing
//! into a queue that `accept` takes from.
//!
//! Defined behaviour at the edges:
//! - **connections arriving faster than the application accepts**: once `BACKLOG` accepted
//!   sockets wait in the queue, the accept is cancelled and the kernel's listen backlog holds
//!   the rest; the next `accept` that finds the queue empty arms it again. The memory and
//!   descriptors one listener holds are bounded.
//! - **an error** (`EMFILE`, `ENFILE`, ...): the accept stops and the error goes to the next
//!   `accept`, which arms it again after that.
//! - **the listener dropped**: the accept is cancelled, and every socket queued or completing
//!   afterwards is closed.
//!
//! [`SocketIo::Multishot`]: crate::net::SocketIo::Multishot

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, types};

use super::multishot::{Armed, Close};
use crate::event_loop::{Reactor, Remote};
use crate::fd::ops::{Completion, OnComplete, OpCallback};
use crate::lockfree::sync::Arc;
use crate::rt::budget;

/// Accepted sockets a listener queues before its accept pauses.
const BACKLOG: usize = 64;

/// The accept state of one listener, shared with the reactor while an accept is armed.
pub(crate) struct MultiAccept {
    shared: Arc<Remote>,
    fd: RawFd,
    queue: RefCell<VecDeque<OwnedFd>>,
    armed: Armed,
    error: RefCell<Option<io::Error>>,
    waker: RefCell<Option<Waker>>,
    closed: Cell<bool>,
}

impl MultiAccept {
    /// The accept state of the listener on `fd` (kept open by the listener while it arms).
    pub(crate) fn new(r: &Reactor, fd: RawFd) -> Rc<MultiAccept> {
        Rc::new(MultiAccept {
            shared: r.shared().clone(),
            fd,
            queue: RefCell::new(VecDeque::new()),
            armed: Armed::default(),
            error: RefCell::new(None),
            waker: RefCell::new(None),
            closed: Cell::new(false),
        })
    }

    /// The next accepted socket, else the accept's error, else arms the accept and waits.
    pub(crate) fn poll_accept(self: &Rc<Self>, cx: &mut Context<'_>) -> Poll<io::Result<OwnedFd>> {
        // A queued socket is accepted without waiting: only while the poll has budget left.
        std::task::ready!(budget::poll_proceed(cx));
        let queued = self.queue.borrow_mut().pop_front();
        if let Some(fd) = queued {
            budget::spend(0);
            return Poll::Ready(Ok(fd));
        }
        if let Some(e) = self.error.borrow_mut().take() {
            return Poll::Ready(Err(e));
        }
        if self.armed.id().is_none() {
            // At the reactor's bound of operations in flight: arm once there is room.
            let room = Reactor::with_current_for(&self.shared, |r| r.poll_op_room(cx));
            if room == Some(Poll::Pending) {
                return Poll::Pending;
            }
            if let Err(e) = self.arm() {
                return Poll::Ready(Err(e));
            }
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }

    fn arm(self: &Rc<Self>) -> io::Result<()> {
        let sqe = opcode::AcceptMulti::new(types::Fd(self.fd))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build();
        let callback = OpCallback::Shared(self.clone());
        let id = Reactor::with_current_for(&self.shared, |r| {
            // SAFETY: the accept refers to no memory (no address buffer); the listener keeps
            // its fd open while it arms accepts and cancels the accept when it goes.
            unsafe { r.submit_op(sqe, callback) }
        })
        .unwrap_or_else(|| Err(crate::rt::no_reactor()))?;
        self.armed.set(id);
        Ok(())
    }
}

impl Close for MultiAccept {
    /// The listener is going: closes the queued sockets and cancels the accept.
    fn close(&self) {
        self.closed.set(true);
        self.queue.borrow_mut().clear();
        self.armed.cancel(&self.shared);
    }
}

impl OnComplete for MultiAccept {
    fn on_complete(&self, _: &Reactor, c: Completion) {
        self.armed.completed(c.more());
        if c.result >= 0 {
            // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
            if self.closed.get() {
                return; // closed with `fd`
            }
            let mut q = self.queue.borrow_mut();
            q.push_back(fd);
            if q.len() >= BACKLOG && c.more() {
                drop(q);
                self.armed.cancel(&self.shared);
            }
        } else if -c.result != libc::ECANCELED && !self.closed.get() {
            *self.error.borrow_mut() = Some(io::Error::from_raw_os_error(-c.result));
        }
        let w = self.waker.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }
}
