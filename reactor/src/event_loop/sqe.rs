//! Caller-built io_uring SQEs on the reactor's own ring ([`Reactor::submit_sqe`]), their
//! cancellation, and the wait for those in flight when the reactor is dropped.

use std::io;
use std::time::Duration;

use super::*;
use crate::fd::ops::OpCallback;

impl Reactor {
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
    /// `Unsupported` on the epoll backend; `WouldBlock` when
    /// [`max_sqes_in_flight`](crate::Builder::max_sqes_in_flight) operations of this call are
    /// in flight, or the ring's submission queue and backlog are full (the kernel is busy):
    /// let the reactor iterate (completions are dispatched, the queue submitted) and submit
    /// again; the ring's error if the SQE cannot be queued.
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
        // SAFETY: the caller's guarantee is passed on.
        unsafe { self.submit_op(sqe, OpCallback::Boxed(Box::new(on_complete))) }
    }

    /// [`submit_sqe`](Self::submit_sqe) for a 128-byte SQE, on a reactor built with
    /// [`Builder::sqe128`](crate::Builder::sqe128): above all `IORING_OP_URING_CMD` with up to
    /// 80 bytes of command (`opcode::UringCmd80`). Completion, cancellation
    /// ([`cancel_sqe`](Self::cancel_sqe)), the bound on operations in flight and the wait at the
    /// reactor's drop are `submit_sqe`'s. A command the kernel cannot cancel (one parked in a
    /// driver that has no cancellation for it, such as a FUSE ring entry waiting for a request)
    /// ends when its driver ends it; until then the callback, and whatever it owns, is kept.
    /// At the reactor's drop such a command is waited for like any other (up to 10 s), then
    /// its callback is leaked rather than freed under the kernel: end the driver's side first
    /// (a FUSE export unmounts, which completes its entries with `-ENOTCONN`).
    ///
    /// # Safety
    /// As for `submit_sqe`.
    ///
    /// # Errors
    /// As for `submit_sqe`; `Unsupported` on a reactor whose ring takes 64-byte SQEs, and on
    /// epoll.
    ///
    /// A socket command, which needs no device: how many bytes wait to be read
    /// (`SOCKET_URING_OP_SIOCINQ`, Linux 6.7).
    ///
    /// ```
    /// use reactor::{Backend, Builder, io_uring::{opcode, types}};
    /// use std::os::fd::AsRawFd;
    /// let Ok(r) = Builder::new().backend(Backend::Uring).sqe128(true).build() else {
    ///     return Ok(()); // no io_uring here
    /// };
    /// let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    /// let a = std::net::TcpStream::connect(l.local_addr()?)?;
    /// let (b, _) = l.accept()?;
    /// std::io::Write::write_all(&mut &b, b"hello")?;
    /// while a.peek(&mut [0; 8])? < 5 {} // loopback has carried them
    /// // (Socket commands need a protocol with ioctls: TCP or UDP, not Unix sockets.)
    /// const SOCKET_URING_OP_SIOCINQ: u32 = 0;
    /// let sqe = opcode::UringCmd80::new(types::Fd(a.as_raw_fd()), SOCKET_URING_OP_SIOCINQ).build();
    /// let queued = std::rc::Rc::new(std::cell::Cell::new(None));
    /// let q = queued.clone();
    /// // SAFETY: the command refers to no memory; `a` outlives it (the loop runs it to its end).
    /// unsafe { r.submit_sqe128(sqe, move |_, c| q.set(Some(c.result))) }?;
    /// r.run_until(|| queued.get().is_some());
    /// assert_eq!(queued.get(), Some(5));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub unsafe fn submit_sqe128(
        &self,
        sqe: io_uring::squeue::Entry128,
        on_complete: impl FnMut(&Reactor, Completion) + 'static,
    ) -> io::Result<OpId> {
        if !self.monitor.borrow().sqe128() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "reactor: a 128-byte SQE needs a ring of 128-byte SQEs: build the reactor with \
                 Builder::sqe128(true) on the io_uring backend",
            ));
        }
        let callback = OpCallback::Boxed(Box::new(on_complete));
        // SAFETY: the caller's guarantee is passed on.
        unsafe { self.submit_with(callback, |m, token| m.push128(sqe, token, true)) }
    }

    /// Whether this reactor's ring takes 128-byte SQEs ([`Builder::sqe128`](crate::Builder::sqe128)
    /// on the io_uring backend).
    pub fn sqe128(&self) -> bool {
        self.monitor.borrow().sqe128()
    }

    /// [`submit_sqe`](Self::submit_sqe) with the callback already made (for the runtime's
    /// operations, whose callback is their shared state).
    ///
    /// # Safety
    /// As for `submit_sqe`: what the SQE refers to stays valid until `callback` has seen the
    /// last completion.
    pub(crate) unsafe fn submit_op(
        &self,
        sqe: io_uring::squeue::Entry,
        callback: OpCallback,
    ) -> io::Result<OpId> {
        // SAFETY: the caller's guarantee is passed on.
        unsafe { self.submit_with(callback, |m, token| m.push(sqe, token, true)) }
    }

    /// Gives `callback` an operation id and queues the SQE with it through `push`; the id
    /// is given back if the SQE cannot be queued.
    ///
    /// # Safety
    /// What the SQE that `push` queues refers to stays valid until `callback` has seen its
    /// last completion.
    unsafe fn submit_with(
        &self,
        callback: OpCallback,
        push: impl FnOnce(&mut Monitor, u64) -> io::Result<()>,
    ) -> io::Result<OpId> {
        self.birth.check()?;
        if matches!(callback, OpCallback::Boxed(_)) && self.ops.users_full() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "reactor: as many submit_sqe operations in flight as it allows (Builder::max_sqes_in_flight): let the loop dispatch completions first",
            ));
        }
        let id = self.ops.insert(callback);
        if let Err(e) = push(&mut self.monitor.borrow_mut(), id.token()) {
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
        self.birth.check()?;
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
                .push(sqe, crate::fd::ops::IGNORED_TOKEN, false)
        }
    }

    /// Cancels the operation `id` of the reactor owning `shared`, from its thread: at once
    /// inside its poll, else at its next iteration (a oneshot through its handle), so that an
    /// operation whose future was dropped outside the loop does not stay in the kernel, holding
    /// its fd and buffer, until something completes it. A reactor already gone cancelled it
    /// when it went.
    pub(crate) fn cancel_for(shared: &Arc<Remote>, id: OpId) {
        let done = Reactor::with_current_for(shared, |r| {
            let _ = r.cancel_sqe(id);
        });
        if done.is_none() {
            let _ = Handle::new(shared.clone()).oneshot(move |r| {
                // (`NotFound` if it completed meanwhile: nothing to do.)
                let _ = r.cancel_sqe(id);
            });
        }
    }

    /// Whether a runtime operation can be submitted now: the ring's submission queue and
    /// backlog are not full.
    pub(crate) fn has_op_room(&self) -> bool {
        !self.monitor.borrow().sq_full()
    }

    /// Whether a runtime operation can be submitted now; else registers `cx`'s task to be
    /// woken after the next wait, which submits the ring's backlog.
    pub(crate) fn poll_op_room(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.has_op_room() {
            return std::task::Poll::Ready(());
        }
        self.stats
            .op_room_waits
            .set(self.stats.op_room_waits.get() + 1);
        self.ops.wait_for_room(cx.waker());
        std::task::Poll::Pending
    }

    /// Number of io_uring operations in flight.
    pub fn ops_in_flight(&self) -> usize {
        self.ops.in_flight()
    }

    /// Cancels every operation in flight and waits for their completions, dropping their
    /// callbacks unrun (reactor drop). Bounded: after 10 s, the rest are leaked rather than
    /// freed under the kernel's feet.
    pub(super) fn quiesce_ops(&self) {
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
}
