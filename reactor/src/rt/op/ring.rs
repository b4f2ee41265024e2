//! The io_uring path of an [`Op`]: [`run`], and the future it awaits.
//!
//! The operation (its buffers, the fd's keeper, a path) moves into a state shared with the
//! reactor before its SQE is built, and comes back with the completion. That state is also the
//! operation's completion callback, so an operation costs one allocation. If the future is
//! dropped first, the operation is cancelled (`ASYNC_CANCEL`, at once inside the reactor's
//! poll, else at its next iteration) and stays in the state until the completion arrives; then
//! [`Op::orphan`] disposes of what it produced (closes the fd an accept or open returned) or
//! keeps it where its owner finds it (bytes a stream's receive took, `in_order.rs`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use super::Op;
use crate::event_loop::{Reactor, Remote};
use crate::fd::ops::{Completion, OnComplete, OpCallback, OpId};
use crate::io::no_reactor;
use crate::lockfree::sync::Arc;

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
pub(super) async fn run<O: Op>(op: O) -> O::Output {
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
