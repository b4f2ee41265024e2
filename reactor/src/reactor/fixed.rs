//! The ring's fixed buffers: which buffer pool owns the registration
//! ([`FixedBufPool`](crate::fs::FixedBufPool) is the public side).
//!
//! io_uring has one fixed-buffer table per ring, so a reactor has at most one registered pool.
//! The pool is known by a liveness token (`Arc<()>`): the reactor keeps a `Weak` of it, so it
//! can tell whether the registered pool still exists without knowing its type.

use std::io;
use std::sync::{Arc, Weak};

use super::Reactor;

impl Reactor {
    /// Registers `iovs` as the ring's fixed buffers for the pool whose token is `owner`. A
    /// registration left by a pool that no longer exists is dropped first.
    ///
    /// # Errors
    /// `AlreadyExists` while another pool is registered; the kernel's error otherwise
    /// (`ENOMEM` past the locked-memory limit, `EINVAL` for too many or too large buffers).
    ///
    /// # Safety
    /// The memory `iovs` describe stays allocated as long as `owner` lives.
    pub(crate) unsafe fn register_fixed_buffers(
        &self,
        iovs: &[libc::iovec],
        owner: &Arc<()>,
    ) -> io::Result<()> {
        let mut slot = self.fixed_buffers.borrow_mut();
        if let Some(old) = slot.as_ref() {
            if old.strong_count() > 0 {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "this reactor already has a registered buffer pool (io_uring has one fixed-buffer table per ring): drop it and its buffers first",
                ));
            }
            self.monitor.borrow_mut().unregister_buffers()?;
            *slot = None;
        }
        // SAFETY: the caller keeps the memory while `owner` lives; when `owner` is gone, the
        // registration is dropped (here, or by `unregister_fixed_buffers`) before new buffers
        // can be used through it.
        unsafe { self.monitor.borrow_mut().register_buffers(iovs) }?;
        *slot = Some(Arc::downgrade(owner));
        Ok(())
    }

    /// Whether the pool whose token is `owner` is this reactor's registered one (then its
    /// buffers can be named by index in `READ_FIXED`/`WRITE_FIXED` on this ring).
    pub(crate) fn has_fixed_buffers(&self, owner: &Arc<()>) -> bool {
        self.fixed_buffers
            .borrow()
            .as_ref()
            .is_some_and(|w| Weak::as_ptr(w) == Arc::as_ptr(owner))
    }

    /// Drops the registration if the pool whose token is `owner` made it (the pool is being
    /// dropped on this reactor's thread).
    pub(crate) fn unregister_fixed_buffers(&self, owner: *const ()) {
        let mut slot = self.fixed_buffers.borrow_mut();
        if slot.as_ref().is_some_and(|w| Weak::as_ptr(w) == owner) {
            // An error leaves the table registered; the pages stay pinned until the next
            // registration or the reactor's drop, and nothing can name them meanwhile.
            let _ = self.monitor.borrow_mut().unregister_buffers();
            *slot = None;
        }
    }
}
