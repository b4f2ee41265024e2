//! The io_uring path of an [`Op`]: [`UringOp`], a future for one io_uring operation whose
//! resources live until the kernel is done with them, and [`run`].
//!
//! The resources (buffers, the fd, a path) move into a cell shared with the completion
//! callback before the SQE is built from them, and come back with the completion. If the
//! future is dropped first, the operation is cancelled (`ASYNC_CANCEL`) and the resources stay
//! in the cell until the completion arrives; an optional `orphan` function then disposes of
//! what the operation produced (for example closes the fd an accept or open returned).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::squeue::Entry;

use super::Op;
use crate::fd::ops::{Completion, OnComplete, OpCallback, OpId};
use crate::io::no_reactor;
use crate::lockfree::sync::Arc;
use crate::reactor::{Reactor, Shared};

struct State<T> {
    done: Cell<Option<Completion>>,
    waker: RefCell<Option<Waker>>,
    resources: RefCell<Option<T>>,
    abandoned: Cell<bool>,
    orphan: Option<fn(T, Completion)>,
}

impl<T> State<T> {
    /// Disposes of the resources and result of an operation nobody will collect.
    fn orphan(&self, c: Completion) {
        let res = self.resources.borrow_mut().take();
        if let (Some(res), Some(orphan)) = (res, self.orphan) {
            orphan(res, c);
        }
    }
}

/// The future of one io_uring operation; resolves to its completion and its resources.
pub(crate) struct UringOp<T: 'static> {
    state: Rc<State<T>>,
    id: OpId,
    shared: Arc<Shared>,
    finished: bool,
}

impl<T: 'static> UringOp<T> {
    /// Moves `resources` into the operation, builds its SQE from them and submits it on the
    /// current reactor. On failure the resources come back with the error.
    ///
    /// # Safety
    /// The SQE `build` returns must refer only to memory owned by the resources (and stable
    /// when they move, like a Vec's heap block) or to memory that outlives the operation.
    pub(crate) unsafe fn submit(
        resources: T,
        build: impl FnOnce(&mut T) -> Entry,
        orphan: Option<fn(T, Completion)>,
    ) -> Result<UringOp<T>, (io::Error, T)> {
        let state = Rc::new(State {
            done: Cell::new(None),
            waker: RefCell::new(None),
            resources: RefCell::new(Some(resources)),
            abandoned: Cell::new(false),
            orphan,
        });
        let sqe = build(state.resources.borrow_mut().as_mut().expect("just stored"));
        // The state is the callback too: one allocation per operation.
        let callback = OpCallback::Shared(state.clone());
        let submitted = Reactor::with_current(|r| {
            // SAFETY: the SQE refers to the resources, which the state keeps until the final
            // completion (the reactor holds the state until then).
            unsafe { r.submit_op(sqe, callback) }.map(|id| (id, r.shared().clone()))
        })
        .unwrap_or_else(|| Err(no_reactor()));
        match submitted {
            Ok((id, shared)) => Ok(UringOp {
                state,
                id,
                shared,
                finished: false,
            }),
            Err(e) => {
                // Not submitted: the callback (and its share of the state) is gone.
                let res = state.resources.borrow_mut().take().expect("not taken");
                Err((e, res))
            }
        }
    }
}

impl<T: 'static> OnComplete for State<T> {
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

impl<T: 'static> Future for UringOp<T> {
    type Output = (Completion, T);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.state.done.take() {
            Some(c) => {
                self.finished = true;
                let res = self
                    .state
                    .resources
                    .borrow_mut()
                    .take()
                    .expect("resources come back once");
                Poll::Ready((c, res))
            }
            None => {
                *self.state.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T: 'static> Drop for UringOp<T> {
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
        // Cancel it; the callback disposes of the resources when the completion arrives. Off
        // the reactor's poll (rare), the operation just runs to completion.
        let id = self.id;
        Reactor::with_current_for(&self.shared, |r| {
            let _ = r.cancel_sqe(id);
        });
    }
}

/// Runs `op` as an io_uring operation on the current reactor's ring.
pub(super) async fn run<O: Op>(op: O) -> O::Output {
    // SAFETY: `Op`'s contract: the SQE refers only to what the operation owns (stable when
    // moved) or to memory that outlives it.
    let submitted = unsafe { UringOp::submit(op, |op| op.sqe(), Some(orphan::<O>)) };
    match submitted {
        Ok(fut) => {
            let (c, op) = fut.await;
            op.complete(c.into_result().map(|n| n as usize))
        }
        Err((e, op)) => op.complete(Err(e)),
    }
}

/// Disposes of what a completed operation nobody collected produced.
fn orphan<O: Op>(op: O, c: Completion) {
    if c.result >= 0 {
        op.orphan(c.result as usize);
    }
}
