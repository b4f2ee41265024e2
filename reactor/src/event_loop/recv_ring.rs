//! The reactor's provided-buffer ring for multishot receives ([`SocketIo::Multishot`]):
//! created and registered on first use, unregistered at drop once every receive is over.
//!
//! [`SocketIo::Multishot`]: crate::net::SocketIo::Multishot

use std::io;
use std::rc::Rc;

use super::Reactor;
use crate::fd::buf_ring::{RECV_GROUP, RecvRing};

/// Buffers in a reactor's ring, and the size of each: 2 MiB per reactor that receives this way.
/// A stream holds at most [`STREAM_BUFS`] of them before its receive pauses.
pub(crate) const RING_BUFS: u16 = 512;
/// See [`RING_BUFS`].
pub(crate) const BUF_SIZE: u32 = 4096;
/// Buffers of received data one stream may hold unread before its multishot receive is
/// cancelled (back-pressure: the socket's own buffer and the TCP window take over); it is armed
/// again when the application has read them.
pub(crate) const STREAM_BUFS: usize = 8;

impl Reactor {
    /// The provided-buffer ring, created and registered on first use.
    ///
    /// # Errors
    /// `Unsupported` on epoll; `ENOMEM`, or `EINVAL` on a kernel without provided-buffer rings
    /// (before 5.19), from the registration.
    pub(crate) fn recv_ring(&self) -> io::Result<Rc<RecvRing>> {
        if let Some(r) = self.recv_ring.borrow().as_ref() {
            return Ok(r.clone());
        }
        let ring = Rc::new(RecvRing::new(RING_BUFS, BUF_SIZE)?);
        // SAFETY: the reactor keeps a share of the ring (its memory) until `drop_recv_ring`,
        // which runs after every operation was cancelled and completed, and unregisters it
        // first.
        unsafe {
            self.monitor
                .borrow_mut()
                .register_buf_ring(ring.addr(), ring.count(), RECV_GROUP)
        }
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "SocketIo::Multishot: registering the receive buffer ring failed (provided-buffer rings need Linux 5.19; choose SocketIo::Completion on older kernels): {e}"
                ),
            )
        })?;
        *self.recv_ring.borrow_mut() = Some(ring.clone());
        Ok(ring)
    }

    /// At drop, after every operation is over: unregisters the ring. If that fails, the memory
    /// is leaked rather than freed while the kernel may still name it (closing the ring, just
    /// after, drops the kernel's registration; the memory stays leaked).
    pub(super) fn drop_recv_ring(&self) {
        if let Some(ring) = self.recv_ring.borrow_mut().take() {
            if let Err(e) = self.monitor.borrow_mut().unregister_buf_ring(RECV_GROUP) {
                tracing::error!(error = %e, "reactor: unregistering the receive buffer ring failed; leaking it");
                std::mem::forget(ring);
            }
        }
    }
}
