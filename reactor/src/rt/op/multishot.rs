//! A stream's multishot receive ([`SocketIo::Multishot`]): one `RECV` with
//! `IORING_RECV_MULTISHOT` armed for as long as the application keeps reading, the kernel
//! picking a buffer from the reactor's provided-buffer ring for each arrival; reads copy out of
//! those buffers and give each back once read.
//!
//! Defined behaviour at the edges:
//! - **a peer that sends faster than the application reads**: a stream's share of the ring is
//!   `STREAM_BUFS` buffers (32 KiB). Each receive is armed with a total byte limit of the room
//!   left in that share (`optlen`, Linux 6.17+), so the kernel ends it by itself there, even
//!   while the loop's thread waits for a CPU and cannot reap or cancel (without
//!   `DEFER_TASKRUN` the kernel receives for the thread whenever it enters the kernel, up to
//!   the whole ring in one go). A buffer that arrives while the stream already holds its share
//!   in ring buffers (the limit may be passed by the rest of one buffer; older kernels have
//!   no limit, and the receive is cancelled instead, late) is copied out into the stream's own
//!   memory and given back at once. So after each reap a stream holds at most its share of the
//!   ring, and with the limit at most its share plus one buffer in all; the socket's own
//!   buffer and the TCP window hold the peer back, and the receive is armed again once the
//!   application has read half of what the stream holds. No byte is lost.
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

use crate::event_loop::recv_ring::{BUF_SIZE, STREAM_BUFS};
use crate::event_loop::{Reactor, Remote};
use crate::fd::buf_ring::{RECV_GROUP, RecvRing};
use crate::fd::ops::{Completion, OnComplete, OpCallback, OpId};
use crate::lockfree::sync::Arc;
use crate::rt::budget;

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
    pub(crate) fn cancel(&self, shared: &Arc<Remote>) {
        let Some(id) = self.id.get() else { return };
        if self.cancelling.replace(true) {
            return;
        }
        Reactor::cancel_for(shared, id);
    }
}

/// Where received bytes not yet read are.
enum Data {
    /// In buffer `bid` of the ring, out of the ring until read.
    Ring(u16),
    /// Copied out of the ring, which got its buffer back at once (the stream held its share).
    Heap(Box<[u8]>),
}

/// Received bytes not yet read: `len` bytes of `data` from `off`.
struct Chunk {
    data: Data,
    off: u32,
    len: u32,
}

/// The bytes one stream may hold unread: its share of the ring ([`STREAM_BUFS`] buffers).
const SHARE_BYTES: u32 = STREAM_BUFS as u32 * BUF_SIZE;

/// The receive state of one stream, shared with the reactor while a receive is armed (it is
/// the operation's completion callback).
pub(crate) struct MultiRecv {
    ring: Rc<RecvRing>,
    shared: Arc<Remote>,
    fd: RawFd,
    chunks: RefCell<VecDeque<Chunk>>,
    /// Of `chunks`, how many are ring buffers.
    ring_chunks: Cell<usize>,
    /// Bytes in `chunks`.
    held_bytes: Cell<u32>,
    /// The armed receive, if any.
    armed: Armed,
    /// Whether the armed receive carries a byte limit (`optlen`), and has delivered nothing yet.
    limited_and_fresh: Cell<bool>,
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
            ring_chunks: Cell::new(0),
            held_bytes: Cell::new(0),
            armed: Armed::default(),
            limited_and_fresh: Cell::new(false),
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
        if budget::poll_proceed(cx).is_pending() {
            return Some(Poll::Pending);
        }
        let n = self.copy_out(dst);
        if n > 0 {
            budget::spend(n);
            // Half the share read: receive again meanwhile, up to the share (if the reactor
            // has room for one more operation; else the read that finds nothing arms it).
            if self.held_bytes.get() <= SHARE_BYTES / 2 && self.may_arm() && self.room() {
                if let Err(e) = self.arm() {
                    *self.error.borrow_mut() = Some(e);
                }
            }
            return Some(Poll::Ready(Ok(n)));
        }
        let error = self.error.borrow_mut().take();
        if let Some(e) = error {
            budget::spend(0);
            return Some(Poll::Ready(Err(e)));
        }
        if self.eof.get() {
            // (A task that reads on after the end gets it at once each time: it spends too.)
            budget::spend(0);
            return Some(Poll::Ready(Ok(0)));
        }
        if self.armed.id().is_none() {
            if self.ring.available() == 0 {
                return None;
            }
            // At the reactor's bound of operations in flight: arm once there is room.
            let room = Reactor::with_current_for(&self.shared, |r| r.poll_op_room(cx));
            if room == Some(Poll::Pending) {
                return Some(Poll::Pending);
            }
            if let Err(e) = self.arm() {
                return Some(Poll::Ready(Err(e)));
            }
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        Some(Poll::Pending)
    }

    /// Whether a receive may be armed now: none is, the stream is open and not at its end,
    /// and the ring has buffers.
    fn may_arm(&self) -> bool {
        self.armed.id().is_none()
            && !self.eof.get()
            && !self.closed.get()
            && self.error.borrow().is_none()
            && self.ring.available() > 0
    }

    /// Whether the reactor can take one more operation now (without waiting for room).
    fn room(&self) -> bool {
        Reactor::with_current_for(&self.shared, |r| r.has_op_room()).unwrap_or(false)
    }

    /// Copies what was received into `dst` (from its start), giving back each ring buffer read
    /// to its end. Returns how many bytes it wrote.
    fn copy_out(&self, dst: &mut [MaybeUninit<u8>]) -> usize {
        let mut chunks = self.chunks.borrow_mut();
        let mut n = 0;
        while n < dst.len() {
            let Some(c) = chunks.front_mut() else { break };
            let k = (c.len as usize).min(dst.len() - n);
            let src = match &c.data {
                // SAFETY: the buffer is out (delivered to this stream, not given back) and
                // `off..off + k` is within what its completion reported.
                Data::Ring(bid) => unsafe { self.ring.data(*bid, c.off, k as u32) },
                Data::Heap(b) => &b[c.off as usize..c.off as usize + k],
            };
            // SAFETY: `src` has `k` bytes, `dst[n..]` room for at least `k`; the ring's (or the
            // heap copy's) memory and the caller's do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst[n..].as_mut_ptr().cast(), k) };
            n += k;
            c.off += k as u32;
            c.len -= k as u32;
            if c.len == 0 {
                if let Some(Chunk {
                    data: Data::Ring(bid),
                    ..
                }) = chunks.pop_front()
                {
                    self.ring.give(bid);
                    self.ring_chunks.set(self.ring_chunks.get() - 1);
                }
            }
        }
        self.held_bytes.set(self.held_bytes.get() - n as u32);
        n
    }

    /// Arms the multishot receive on the reactor's ring: on kernels that have the limit
    /// (Linux 6.17), one that ends by itself once it has received the room left in the
    /// stream's share, so the stream cannot take more of the ring even while its thread does
    /// not run (the kernel then keeps receiving into provided buffers without the loop).
    fn arm(self: &Rc<Self>) -> io::Result<()> {
        let room = SHARE_BYTES
            .saturating_sub(self.held_bytes.get())
            .max(BUF_SIZE);
        let limited = self.ring.byte_limit_works();
        let sqe = opcode::RecvMulti::new(types::Fd(self.fd), RECV_GROUP).build();
        let sqe = if limited {
            with_total_limit(sqe, room)
        } else {
            sqe
        };
        let callback = OpCallback::Shared(self.clone());
        let id = Reactor::with_current_for(&self.shared, |r| {
            r.count_recv_arm();
            // SAFETY: the receive writes only into buffers of the ring, which the reactor keeps
            // allocated until every operation is over; the stream keeps the fd open while it
            // arms receives, and cancels the receive when it goes.
            unsafe { r.submit_op(sqe, callback) }
        })
        .unwrap_or_else(|| Err(crate::rt::no_reactor()))?;
        self.armed.set(id);
        self.limited_and_fresh.set(limited);
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

    /// Keeps `len` bytes that arrived in ring buffer `bid`: in the buffer while the stream holds
    /// less than its share of the ring (and nothing copied out, which must be read first);
    /// else copied out and the buffer given back at once, so that whatever the kernel delivered
    /// before the loop could stop it, the ring keeps all but this stream's share for the others.
    fn keep(&self, r: &Reactor, bid: u16, len: u32) {
        let mut chunks = self.chunks.borrow_mut();
        let spilling = matches!(
            chunks.back(),
            Some(Chunk {
                data: Data::Heap(_),
                ..
            })
        );
        let data = if self.ring_chunks.get() < STREAM_BUFS && !spilling {
            self.ring_chunks.set(self.ring_chunks.get() + 1);
            Data::Ring(bid)
        } else {
            // SAFETY: the buffer is out (just delivered) and its completion reported `len`
            // bytes.
            let copy = unsafe { self.ring.data(bid, 0, len) }.into();
            self.ring.give(bid);
            r.count_recv_copied(len);
            Data::Heap(copy)
        };
        chunks.push_back(Chunk { data, off: 0, len });
        self.held_bytes.set(self.held_bytes.get() + len);
    }
}

/// `sqe` (a multishot `RECV`) with a total byte limit: `optlen` (bytes 44..48 of the SQE),
/// which Linux 6.17+ reads as "end the receive once it has delivered this many bytes" (it may
/// go past it by the rest of one buffer) and older kernels refuse with `EINVAL`.
fn with_total_limit(sqe: io_uring::squeue::Entry, limit: u32) -> io_uring::squeue::Entry {
    const _: () = assert!(std::mem::size_of::<io_uring::squeue::Entry>() == 64);
    // SAFETY: `Entry` is `repr(C)` around the kernel's 64-byte `io_uring_sqe` (size checked
    // above): its bytes are the SQE's, and any bytes are a valid `[u8; 64]`.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
    raw[44..48].copy_from_slice(&limit.to_ne_bytes());
    // SAFETY: the same bytes with one `u32` field of the union at offset 44 set; every bit
    // pattern is a valid SQE to the type (the kernel checks the values).
    unsafe { std::mem::transmute::<[u8; 64], io_uring::squeue::Entry>(raw) }
}

impl Close for MultiRecv {
    /// The stream is going: gives back what it holds and cancels its receive.
    fn close(&self) {
        self.closed.set(true);
        for c in self.chunks.borrow_mut().drain(..) {
            if let Data::Ring(bid) = c.data {
                self.ring.give(bid);
            }
        }
        self.ring_chunks.set(0);
        self.held_bytes.set(0);
        self.armed.cancel(&self.shared);
    }
}

impl OnComplete for MultiRecv {
    fn on_complete(&self, r: &Reactor, c: Completion) {
        self.armed.completed(c.more());
        let fresh = self.limited_and_fresh.replace(false);
        if c.flags & CQE_F_BUFFER != 0 {
            let bid = (c.flags >> CQE_BUFFER_SHIFT) as u16;
            self.ring.took(bid);
            if self.closed.get() || c.result <= 0 {
                self.ring.give(bid);
            } else {
                self.keep(r, bid, c.result as u32);
                if !self.ring.byte_limit_works()
                    && self.ring_chunks.get() >= STREAM_BUFS
                    && c.more()
                {
                    // Back-pressure without the kernel's limit: stop receiving until the
                    // application reads (what the kernel delivers meanwhile is copied out).
                    self.armed.cancel(&self.shared);
                }
            }
        } else if c.result == 0 {
            self.eof.set(true);
        } else if c.result < 0 {
            match -c.result {
                // A kernel without the receive's byte limit (before 6.17) refuses it: receive
                // without it from now on, pausing the receive instead (the next read arms it).
                libc::EINVAL if fresh => self.ring.no_byte_limit(),
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

#[cfg(all(test, feature = "uring"))]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use crate::event_loop::recv_ring::STREAM_BUFS;
    use crate::net::{SocketIo, TcpListener};
    use crate::{Backend, Reactor};

    /// Before Linux 6.17 (forced here) a receive has no byte limit: a fast sender's receive is
    /// stopped by cancellation, late, and what the kernel delivers beyond the stream's share is
    /// copied out of the ring. The stream still holds at most its share of the ring once the
    /// loop has reaped, and no byte is lost.
    #[test]
    fn without_the_kernels_byte_limit_a_stream_still_keeps_to_its_share() {
        let r = Reactor::builder()
            .backend(Backend::Uring)
            .socket_io(SocketIo::Multishot)
            .build()
            .expect("the io_uring backend must start here");
        r.recv_ring().unwrap().no_byte_limit();
        let sent: Vec<u8> = (0..8usize << 20).map(|i| (i % 251) as u8).collect();
        let got = r.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = l.local_addr().unwrap();
            let data = sent.clone();
            let writer = std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                c.write_all(b"x").unwrap();
                c.write_all(&data).unwrap();
            });
            let (s, _) = l.accept().await.unwrap();
            let (res, _) = s.read(Vec::with_capacity(1)).await;
            assert_eq!(res.unwrap(), 1, "arms the receive");
            crate::time::sleep(Duration::from_millis(100)).await;
            let held = Reactor::with_current(|r| r.stats().recv_buffers_held).unwrap();
            assert!(
                held <= STREAM_BUFS as u64,
                "the stream holds {held} ring buffers"
            );
            let mut got = Vec::new();
            loop {
                let (res, b) = s.read(Vec::with_capacity(3000)).await;
                if res.unwrap() == 0 {
                    break;
                }
                got.extend_from_slice(&b);
            }
            writer.join().unwrap();
            got
        });
        assert!(got == sent, "every byte, in order");
        let st = r.stats();
        assert!(
            st.recv_bytes_copied > 0,
            "the kernel delivered beyond the share and it was copied out"
        );
        assert_eq!(st.recv_buffers_held, 0);
    }
}
