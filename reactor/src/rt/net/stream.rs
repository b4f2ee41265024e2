//! The socket machinery under TCP and Unix streams and listeners: one read and one write in
//! flight per stream (in order, with what an abandoned receive took kept for the next read),
//! the socket mode's path per operation, and accept.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll};

use crate::event_loop::{Reactor, SocketPath};
use crate::io::{Async, IoBuf, IoBufMut};
use crate::rt::no_reactor;
use crate::rt::op::in_order::{self, Dir};
use crate::rt::op::multishot::{CloseOnDrop, MultiRecv};
use crate::rt::op::multishot_accept::MultiAccept;
use crate::rt::op::socket::{Accept, Recv, SendOp};
use crate::rt::op::{Ready, run_when_ready};
use crate::sys::cvt;

/// The socket machinery shared by TCP and Unix streams.
pub(super) struct Stream<T: AsFd + 'static> {
    pub(super) io: Rc<Async<T>>,
    /// The multishot receive, under [`SocketIo::Multishot`] on io_uring (made on first read;
    /// its buffers given back and its receive cancelled when the stream goes).
    pub(super) recv: CloseOnDrop<MultiRecv>,
    /// One read and one write in flight at a time, and what dropped ones did
    /// (`rt/op/in_order.rs`).
    pub(super) order: Rc<in_order::StreamState>,
}

impl<T: AsFd + 'static> Stream<T> {
    pub(super) fn new(io: T) -> io::Result<Self> {
        Ok(Stream {
            io: Rc::new(Async::new(io)?),
            recv: CloseOnDrop::new(),
            order: in_order::StreamState::new(),
        })
    }

    pub(super) fn fd(&self) -> RawFd {
        self.io.as_fd().as_raw_fd()
    }

    /// The multishot receive, if this stream reads that way (decided on first use).
    pub(super) fn multishot(&self) -> io::Result<Option<&Rc<MultiRecv>>> {
        if let Some(m) = self.recv.0.get() {
            return Ok(m.as_ref());
        }
        let m = Reactor::with_current(|r| {
            if r.socket_path() == SocketPath::Multishot {
                MultiRecv::new(r, self.fd()).map(Some)
            } else {
                Ok(None)
            }
        })
        .unwrap_or_else(|| Err(no_reactor()))?;
        Ok(self.recv.0.get_or_init(|| m).as_ref())
    }

    /// A receive into `buf`, counted as the stream's read in flight.
    pub(super) fn recv_op<B: IoBufMut>(&self, buf: B) -> Recv<T, B> {
        Recv {
            io: self.io.clone(),
            buf,
            turn: self.order.in_flight(Dir::Read),
        }
    }

    /// Moves bytes that a dropped read's receive took into `buf`; how many (0: none).
    pub(super) fn take_held<B: IoBufMut>(&self, buf: &mut B) -> usize {
        if !self.order.has_held() {
            return 0;
        }
        let n = self.order.take_held(room(buf));
        // SAFETY: `take_held` wrote the first `n` bytes of the room.
        unsafe { buf.set_init(n) };
        n
    }

    pub(super) async fn read<B: IoBufMut>(&self, buf: B) -> (io::Result<usize>, B) {
        let mut buf = buf;
        loop {
            // A read before this one whose future was dropped (or another task's) may still be
            // receiving: what it takes from the socket comes before anything newer.
            self.order.gate(Dir::Read).clear().await;
            let n = self.take_held(&mut buf);
            if n > 0 {
                return (Ok(n), buf);
            }
            let m = match self.multishot() {
                Ok(Some(m)) => m.clone(),
                Ok(None) => {
                    return run_when_ready(&self.io, Ready::Read, self.recv_op(buf)).await;
                }
                Err(e) => return (Err(e), buf),
            };
            let res = std::future::poll_fn(|cx| match m.poll_read(cx, room(&mut buf)) {
                Some(p) => p.map(Some),
                None => Poll::Ready(None),
            })
            .await;
            match res {
                Some(res) => {
                    if let Ok(n) = res {
                        // SAFETY: `poll_read` wrote the first `n` bytes of the room.
                        unsafe { buf.set_init(n) };
                    }
                    return (res, buf);
                }
                // The ring has no buffer left: this read receives into `buf` itself, once no
                // other read of the stream is in flight.
                None if self.order.gate(Dir::Read).is_clear() => {
                    return run_when_ready(&self.io, Ready::Read, self.recv_op(buf)).await;
                }
                None => {}
            }
        }
    }

    /// `AsyncRead`: bytes a dropped read's receive took first, then through the multishot
    /// receive if the stream has one, else readiness.
    pub(super) fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.order.gate(Dir::Read).poll_clear(cx).is_pending() {
            return Poll::Pending;
        }
        if self.order.has_held() {
            // SAFETY: initialised bytes may be viewed as possibly uninitialised ones; only
            // initialised bytes are written through the view.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    buf.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(),
                    buf.len(),
                )
            };
            return Poll::Ready(Ok(self.order.take_held(dst)));
        }
        match self.multishot() {
            Ok(Some(m)) => {
                // SAFETY: initialised bytes may be viewed as possibly uninitialised ones; only
                // initialised bytes are written through the view.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        buf.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(),
                        buf.len(),
                    )
                };
                // The ring has no buffer left: this read receives into `buf` itself.
                m.poll_read(cx, dst)
                    .unwrap_or_else(|| self.io.poll_read_fd(cx, buf))
            }
            Ok(None) => self.io.poll_read_fd(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Before the socket leaves the reactor: its multishot receive cancelled and over, and no
    /// received byte left unread.
    pub(super) async fn end_multishot(&self) -> io::Result<()> {
        let Some(Some(m)) = self.recv.0.get() else {
            return Ok(());
        };
        m.close_receive();
        while m.armed() {
            crate::sched::task::yield_now().await;
        }
        if m.has_unread() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the multishot receive holds bytes the application has not read: read them before converting the stream",
            ));
        }
        Ok(())
    }

    pub(super) async fn write<B: IoBuf>(&self, buf: B) -> (io::Result<usize>, B) {
        // A write before this one whose future was dropped (or another task's) may still be
        // sending: bytes go out in the order they were written.
        self.order.gate(Dir::Write).clear().await;
        let op = SendOp {
            io: self.io.clone(),
            buf,
            turn: self.order.in_flight(Dir::Write),
        };
        run_when_ready(&self.io, Ready::Write, op).await
    }

    /// `AsyncWrite`: readiness, after any write in flight.
    pub(super) fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.order.gate(Dir::Write).poll_clear(cx).is_pending() {
            return Poll::Pending;
        }
        let res = self.io.poll_write_fd(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.order.count_sent(n);
        }
        res
    }

    pub(super) async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        crate::io::write_all(buf, |rest, _| self.write(rest)).await
    }

    pub(super) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: a plain system call on an open socket.
        cvt(unsafe { libc::shutdown(self.fd(), how) }).map(drop)
    }
}

/// The listening machinery shared by TCP and Unix listeners.
pub(super) struct Listener<T: AsFd + 'static> {
    pub(super) io: Rc<Async<T>>,
    /// The multishot accept, under [`SocketIo::Multishot`] on io_uring (made on first accept;
    /// its queued sockets closed and its accept cancelled when the listener goes).
    pub(super) accepts: CloseOnDrop<MultiAccept>,
}

impl<T: AsFd + 'static> Listener<T> {
    pub(super) fn new(io: T) -> io::Result<Self> {
        Ok(Listener {
            io: Rc::new(Async::new(io)?),
            accepts: CloseOnDrop::new(),
        })
    }

    pub(super) async fn accept_fd(&self) -> io::Result<OwnedFd> {
        let multishot = match self.accepts.0.get() {
            Some(m) => m.clone(),
            None => {
                let m = Reactor::with_current(|r| {
                    (r.socket_path() == SocketPath::Multishot)
                        .then(|| MultiAccept::new(r, self.io.as_fd().as_raw_fd()))
                })
                .ok_or_else(no_reactor)?;
                self.accepts.0.get_or_init(|| m).clone()
            }
        };
        match multishot {
            Some(m) => std::future::poll_fn(|cx| m.poll_accept(cx)).await,
            None => {
                let io = self.io.clone();
                run_when_ready(&self.io, Ready::Read, Accept { io }).await
            }
        }
    }
}

/// The room of `buf` (all `bytes_total` bytes) as possibly uninitialised bytes.
fn room<B: IoBufMut>(buf: &mut B) -> &mut [std::mem::MaybeUninit<u8>] {
    let len = buf.bytes_total();
    // SAFETY: the buffer's room is `len` bytes at its stable pointer, borrowed mutably with
    // `buf`; viewing it as uninitialised bytes makes no claim about its contents.
    unsafe {
        std::slice::from_raw_parts_mut(
            buf.stable_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(),
            len,
        )
    }
}

/// `addr` as a C socket address.
pub(super) fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
