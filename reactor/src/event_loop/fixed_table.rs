//! The ring's fixed buffers: which buffer pool owns the registration
//! ([`FixedBufPool`](crate::fs::FixedBufPool) is the public side).
//!
//! io_uring has one fixed-buffer table per ring, so a reactor has at most one registered pool
//! (on epoll too, so that code behaves the same on both). The pool is known by a liveness
//! token (`Arc<()>`): the reactor keeps a `Weak` of it, so it can tell whether the registered
//! pool still exists without knowing its type. It also holds the pool's `keep`, where a pool
//! dropped away from this reactor's loop leaves its memory: the table keeps naming that memory
//! until it is unregistered, so the memory is freed only then (or with the reactor).

use std::any::Any;
use std::io;
use std::sync::{Arc, Weak};

use super::Reactor;

/// The registered pool: its liveness token and what keeps its memory.
pub(crate) struct FixedSlot {
    owner: Weak<()>,
    _keep: Arc<dyn Any + Send + Sync>,
}

impl Reactor {
    /// Registers `iovs` as the ring's fixed buffers for the pool whose token is `owner`; the
    /// reactor holds `keep` until the registration is dropped. A registration left by a pool
    /// that no longer exists is dropped first.
    ///
    /// # Errors
    /// `AlreadyExists` while another pool is registered; the kernel's error otherwise
    /// (`ENOMEM` past the locked-memory limit, `EINVAL` for too many or too large buffers, or
    /// the error of dropping the old registration).
    ///
    /// # Safety
    /// The memory `iovs` describe stays allocated while `owner` lives, and after that while
    /// `keep` lives.
    pub(crate) unsafe fn register_fixed_buffers(
        &self,
        iovs: &[libc::iovec],
        owner: &Arc<()>,
        keep: Arc<dyn Any + Send + Sync>,
    ) -> io::Result<()> {
        self.birth.check()?;
        let mut slot = self.fixed_buffers.borrow_mut();
        if let Some(old) = slot.as_ref() {
            if old.owner.strong_count() > 0 {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "this reactor already has a registered buffer pool (io_uring has one fixed-buffer table per ring): drop it and its buffers first",
                ));
            }
            self.monitor.borrow_mut().unregister_buffers()?;
            *slot = None;
        }
        // SAFETY: the caller keeps the memory while `owner` lives and then while `keep` does;
        // the slot holds `keep` until the registration is dropped.
        unsafe { self.monitor.borrow_mut().register_buffers(iovs) }?;
        *slot = Some(FixedSlot {
            owner: Arc::downgrade(owner),
            _keep: keep,
        });
        Ok(())
    }

    /// Whether the pool whose token is `owner` is this reactor's registered one (then its
    /// buffers can be named by index in `READ_FIXED`/`WRITE_FIXED` on this ring).
    pub(crate) fn has_fixed_buffers(&self, owner: &Arc<()>) -> bool {
        self.fixed_buffers
            .borrow()
            .as_ref()
            .is_some_and(|s| Weak::as_ptr(&s.owner) == Arc::as_ptr(owner))
    }

    /// Drops the registration if the pool whose token is `owner` made it (the pool is being
    /// dropped on this reactor's thread). Whether it is gone: on `false` the pool leaves its
    /// memory in its `keep`, and the next registration tries again.
    pub(crate) fn unregister_fixed_buffers(&self, owner: *const ()) -> bool {
        let mut slot = self.fixed_buffers.borrow_mut();
        if slot
            .as_ref()
            .is_none_or(|s| Weak::as_ptr(&s.owner) != owner)
        {
            return false;
        }
        match self.monitor.borrow_mut().unregister_buffers() {
            Ok(()) => {
                *slot = None;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "reactor: fixed buffers stay registered until the next pool or the reactor's drop");
                false
            }
        }
    }
}
