//! Sockets: [`TcpListener`], [`TcpStream`], [`UnixListener`], [`UnixStream`].
//!
//! Streams offer owned-buffer `read`/`write` (`(io::Result<usize>, B)`, like files) and the
//! `futures-io` `AsyncRead`/`AsyncWrite` traits. On io_uring the owned-buffer operations and
//! `accept` run as completion operations (`RECV`, `SEND`, `ACCEPT`) or as readiness plus
//! non-blocking system calls, as [`SocketIo`] says (chosen by [`Builder::socket_io`]; the
//! default was picked by measurement, see [`SocketIo`]); on epoll they always use readiness.
//! `AsyncRead`/`AsyncWrite` use readiness, except that under `SocketIo::Multishot` on io_uring a
//! stream's reads (both kinds) come from its multishot receive and a listener's accepts from
//! its multishot accept (`rt/op/multishot.rs`, `rt/op/multishot_accept.rs`).
//!
//! Dropping an operation's future cancels it: on the completion path its buffer lives until
//! the kernel's completion arrives, and a socket a cancelled `accept` produced is closed.
//! Stream reads are cancel-safe on every backend and mode: bytes a cancelled `RECV` took from
//! the socket before its cancellation landed are kept with the stream and returned, in order,
//! by its next read. A dropped write sent nothing by readiness, and may have sent a prefix of
//! its buffer by an io_uring `SEND`; [`TcpStream::bytes_sent`] after [`TcpStream::flush`]
//! says how much (see [`TcpStream::write`]). A stream runs one read and one write at a time.
//!
//! [`Builder::socket_io`]: crate::Builder::socket_io
//!
//! ```
//! use reactor::{Reactor, net::{TcpListener, TcpStream}};
//! let r = Reactor::new()?;
//! r.block_on(async {
//!     let l = TcpListener::bind("127.0.0.1:0".parse().unwrap())?;
//!     let addr = l.local_addr()?;
//!     let client = reactor::Reactor::with_current(|r| r.spawn_local(async move {
//!         let s = TcpStream::connect(addr).await?;
//!         let (res, _) = s.write_all(b"hi".to_vec()).await;
//!         res
//!     })).unwrap();
//!     let (s, _peer) = l.accept().await?;
//!     let (n, buf) = s.read(Vec::with_capacity(8)).await;
//!     assert_eq!(&buf[..n?], b"hi");
//!     client.await.unwrap()
//! })?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use crate::io::no_reactor;
use crate::io::{Async, IoBuf, IoBufMut, Slice};
use crate::reactor::{Reactor, SocketPath};
use crate::rt::op::in_order::{self, Dir};
use crate::rt::op::multishot::{CloseOnDrop, MultiRecv};
use crate::rt::op::multishot_accept::MultiAccept;
use crate::rt::op::socket::{Accept, Connect, Recv, SendOp};
use crate::rt::op::{Ready, run_when_ready};
use crate::sys::cvt;

pub use crate::reactor::SocketIo;

/// The socket machinery shared by TCP and Unix streams.
struct Stream<T: AsFd + 'static> {
    io: Rc<Async<T>>,
    /// The multishot receive, under [`SocketIo::Multishot`] on io_uring (made on first read;
    /// its buffers given back and its receive cancelled when the stream goes).
    recv: CloseOnDrop<MultiRecv>,
    /// One read and one write in flight at a time, and what dropped ones did
    /// (`rt/op/in_order.rs`).
    order: Rc<in_order::Shared>,
}

impl<T: AsFd + 'static> Stream<T> {
    fn new(io: T) -> io::Result<Self> {
        Ok(Stream {
            io: Rc::new(Async::new(io)?),
            recv: CloseOnDrop::new(),
            order: in_order::Shared::new(),
        })
    }

    fn fd(&self) -> RawFd {
        self.io.as_fd().as_raw_fd()
    }

    /// The multishot receive, if this stream reads that way (decided on first use).
    fn multishot(&self) -> io::Result<Option<&Rc<MultiRecv>>> {
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
    fn recv_op<B: IoBufMut>(&self, buf: B) -> Recv<T, B> {
        Recv {
            io: self.io.clone(),
            buf,
            turn: self.order.in_flight(Dir::Read),
        }
    }

    /// Moves bytes that a dropped read's receive took into `buf`; how many (0: none).
    fn take_held<B: IoBufMut>(&self, buf: &mut B) -> usize {
        if !self.order.has_held() {
            return 0;
        }
        let n = self.order.take_held(room(buf));
        // SAFETY: `take_held` wrote the first `n` bytes of the room.
        unsafe { buf.set_init(n) };
        n
    }

    async fn read<B: IoBufMut>(&self, buf: B) -> (io::Result<usize>, B) {
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
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
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
    async fn end_multishot(&self) -> io::Result<()> {
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

    async fn write<B: IoBuf>(&self, buf: B) -> (io::Result<usize>, B) {
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
    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.order.gate(Dir::Write).poll_clear(cx).is_pending() {
            return Poll::Pending;
        }
        let res = self.io.poll_write_fd(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.order.count_sent(n);
        }
        res
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut buf = buf;
        let mut done = 0;
        while done < buf.len() {
            let (res, slice) = self.write(Slice::new(buf, done)).await;
            buf = slice.into_inner();
            match res {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => done += n,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
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
struct Listener<T: AsFd + 'static> {
    io: Rc<Async<T>>,
    /// The multishot accept, under [`SocketIo::Multishot`] on io_uring (made on first accept;
    /// its queued sockets closed and its accept cancelled when the listener goes).
    accepts: CloseOnDrop<MultiAccept>,
}

impl<T: AsFd + 'static> Listener<T> {
    fn new(io: T) -> io::Result<Self> {
        Ok(Listener {
            io: Rc::new(Async::new(io)?),
            accepts: CloseOnDrop::new(),
        })
    }

    async fn accept_fd(&self) -> io::Result<OwnedFd> {
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

macro_rules! stream_common {
    ($name:ident, $std:ty) => {
        impl $name {
            /// Wraps a connected `std` socket, made non-blocking, on the reactor polling on this
            /// thread: the way to hand a connection accepted on one thread to a reactor on
            /// another (send the `std` socket, wrap it there).
            ///
            /// # Errors
            /// No reactor on this thread; `fcntl` or the fd registration failing.
            pub fn from_std(s: $std) -> io::Result<$name> {
                Ok($name {
                    inner: Stream::new(s)?,
                })
            }

            /// Deregisters it from its reactor and gives the `std` socket back (still
            /// non-blocking). Returns at once unless a dropped read or write on io_uring is
            /// still being cancelled: then it first waits for that completion, which owns a
            /// reference to the socket. Under [`SocketIo::Multishot`] the stream's receive is
            /// cancelled and waited for first.
            ///
            /// # Errors
            /// No reactor on this thread; the fd deregistration failing; `InvalidData` if the
            /// stream holds received bytes the application has not read (from a multishot
            /// receive, or from a dropped read's receive; they are dropped with the stream:
            /// read until the peer pauses before converting).
            pub async fn into_std(self) -> io::Result<$std> {
                self.inner.end_multishot().await?;
                self.inner.order.gate(Dir::Read).clear().await;
                self.inner.order.gate(Dir::Write).clear().await;
                if self.inner.order.has_held() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the stream holds bytes a dropped read received that the application has not read: read them before converting the stream",
                    ));
                }
                let mut io = self.inner.io;
                loop {
                    match Rc::try_unwrap(io) {
                        Ok(a) => return a.into_inner(),
                        Err(shared) => {
                            io = shared;
                            crate::sched::task::yield_now().await;
                        }
                    }
                }
            }

            /// Reads up to `buf.bytes_total()` bytes into the start of `buf` (a `Vec`'s
            /// length becomes the count). 0 means the peer closed its writing half.
            ///
            /// Cancel-safe on every backend and [`SocketIo`] mode: if the future is dropped
            /// (a `timeout`, a `select`, an aborted task) after the kernel received bytes for
            /// it (an io_uring `RECV` that completed before its cancellation landed), those
            /// bytes are kept with the stream and the next read (owned-buffer or `AsyncRead`)
            /// returns them first. Reads of one stream run one at a time: a read waits for the
            /// one before it, dropped or not, to be over.
            pub async fn read<B: IoBufMut>(&self, buf: B) -> (io::Result<usize>, B) {
                self.inner.read(buf).await
            }

            /// Writes some of `buf`'s initialised bytes; returns how many.
            ///
            /// If the future is dropped before it returns: by readiness (epoll, or
            /// [`SocketIo::Readiness`]) nothing of `buf` was sent; by an io_uring `SEND`
            /// ([`SocketIo::Completion`] and [`SocketIo::Multishot`]) the kernel may still
            /// send part or all of it before the cancellation lands. Either way the outcome
            /// is not lost: it counts in [`bytes_sent`](Self::bytes_sent) once
            /// [`flush`](Self::flush) returns. Writes of one stream run one at a time, so
            /// bytes go out in the order they were written.
            pub async fn write<B: IoBuf>(&self, buf: B) -> (io::Result<usize>, B) {
                self.inner.write(buf).await
            }

            /// Writes all of `buf`. If the future is dropped before it returns, a prefix
            /// of `buf` was sent (possibly none, possibly all): its length is what
            /// [`bytes_sent`](Self::bytes_sent) grew by, once [`flush`](Self::flush)
            /// returns.
            pub async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
                self.inner.write_all(buf).await
            }

            /// Waits until no write of this stream is in flight: a write whose future was
            /// dropped may still be in the kernel's hands on io_uring. After it,
            /// [`bytes_sent`](Self::bytes_sent) counts every write started before. (What
            /// `futures-io`'s `flush` does too; nothing is buffered in the stream itself.)
            ///
            /// # Errors
            /// None today; the `io::Result` leaves room for streams that buffer.
            pub async fn flush(&self) -> io::Result<()> {
                self.inner.order.gate(Dir::Write).clear().await;
                Ok(())
            }

            /// How many bytes the kernel has taken from this stream's writes, in all, counting
            /// the writes whose futures were dropped: how a caller learns what a dropped write
            /// sent (read it before the write and after [`flush`](Self::flush)).
            ///
            /// ```
            /// use reactor::{Reactor, net::UnixStream, time};
            /// use std::time::Duration;
            /// let r = Reactor::new()?;
            /// r.block_on(async {
            ///     let (a, _b) = UnixStream::pair()?;
            ///     let before = a.bytes_sent();
            ///     // A write that may be dropped before it returns...
            ///     let _ = time::timeout(Duration::from_micros(1), a.write(vec![7u8; 100])).await;
            ///     a.flush().await?;
            ///     // ...sent this much of its buffer (a prefix), whatever the backend.
            ///     let sent = a.bytes_sent() - before;
            ///     assert!(sent <= 100);
            ///     Ok::<(), std::io::Error>(())
            /// })?;
            /// # Ok::<(), std::io::Error>(())
            /// ```
            pub fn bytes_sent(&self) -> u64 {
                self.inner.order.sent()
            }

            /// Shuts down the reading half, the writing half or both.
            pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
                self.inner.shutdown(how)
            }
        }

        impl AsFd for $name {
            fn as_fd(&self) -> BorrowedFd<'_> {
                self.inner.io.as_fd()
            }
        }

        impl AsRawFd for $name {
            fn as_raw_fd(&self) -> RawFd {
                self.inner.fd()
            }
        }

        impl futures_io::AsyncRead for $name {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut [u8],
            ) -> Poll<io::Result<usize>> {
                self.inner.poll_read(cx, buf)
            }
        }

        impl futures_io::AsyncWrite for $name {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.inner.poll_write(cx, buf)
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.inner.order.gate(Dir::Write).poll_clear(cx).map(Ok)
            }
            fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(self.inner.shutdown(Shutdown::Write))
            }
        }
    };
}

/// A TCP connection.
pub struct TcpStream {
    inner: Stream<std::net::TcpStream>,
}

stream_common!(TcpStream, std::net::TcpStream);

impl TcpStream {
    /// Connects to `addr`: an io_uring `CONNECT` operation, or a non-blocking connect and a
    /// wait for writability (readiness, and on epoll).
    ///
    /// # Errors
    /// The connection's error (`ConnectionRefused`, ...); no reactor on this thread.
    pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: socket(2) takes no pointers.
        let s = unsafe {
            libc::socket(
                domain,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        // SAFETY: a fresh descriptor owned by nobody else.
        let fd = cvt(s).map(|s| unsafe { OwnedFd::from_raw_fd(s as RawFd) })?;
        let stream = TcpStream {
            inner: Stream::new(std::net::TcpStream::from(fd))?,
        };
        let (storage, len) = sockaddr(&addr);
        let op = Connect::new(stream.inner.io.clone(), storage, len);
        run_when_ready(&stream.inner.io, Ready::Write, op).await?;
        Ok(stream)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.io.get_ref().peer_addr()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.io.get_ref().local_addr()
    }

    /// Sets `TCP_NODELAY`.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.inner.io.get_ref().set_nodelay(on)
    }
}

impl fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStream")
            .field("fd", &self.inner.fd())
            .finish()
    }
}

/// A TCP listening socket.
pub struct TcpListener {
    inner: Listener<std::net::TcpListener>,
}

impl TcpListener {
    /// Binds to `addr` and listens (with `SO_REUSEADDR`, as `std` does).
    ///
    /// # Errors
    /// `bind`/`listen`'s; no reactor on this thread.
    pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
        TcpListener::from_std(std::net::TcpListener::bind(addr)?)
    }

    /// Wraps a bound, listening `std` listener (made non-blocking) on the reactor polling on
    /// this thread.
    ///
    /// # Errors
    /// No reactor on this thread; `fcntl` or the fd registration failing.
    pub fn from_std(l: std::net::TcpListener) -> io::Result<TcpListener> {
        Ok(TcpListener {
            inner: Listener::new(l)?,
        })
    }

    /// Accepts a connection.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (s, peer) = self.accept_std().await?;
        Ok((
            TcpStream {
                inner: Stream::new(s)?,
            },
            peer,
        ))
    }

    /// Accepts a connection as a non-blocking `std` socket, registered with no reactor: for a
    /// server that hands connections to reactors on other threads (each wraps its socket
    /// with [`TcpStream::from_std`]).
    pub async fn accept_std(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        let s = std::net::TcpStream::from(self.inner.accept_fd().await?);
        let peer = s.peer_addr()?;
        Ok((s, peer))
    }

    /// The local address (the port chosen for port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.io.get_ref().local_addr()
    }
}

impl fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpListener")
            .field("addr", &self.local_addr().ok())
            .finish()
    }
}

/// A Unix-domain stream connection.
pub struct UnixStream {
    inner: Stream<std::os::unix::net::UnixStream>,
}

stream_common!(UnixStream, std::os::unix::net::UnixStream);

impl UnixStream {
    /// Connects to the socket at `path` (on the thread pool: a Unix connect may block while the
    /// listener's backlog is full).
    pub async fn connect(path: impl AsRef<Path>) -> io::Result<UnixStream> {
        let path = path.as_ref().to_owned();
        let s = crate::rt::blocking::spawn_blocking(move || {
            std::os::unix::net::UnixStream::connect(path)
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??;
        Ok(UnixStream {
            inner: Stream::new(s)?,
        })
    }

    /// A connected pair.
    pub fn pair() -> io::Result<(UnixStream, UnixStream)> {
        let (a, b) = std::os::unix::net::UnixStream::pair()?;
        Ok((
            UnixStream {
                inner: Stream::new(a)?,
            },
            UnixStream {
                inner: Stream::new(b)?,
            },
        ))
    }
}

impl fmt::Debug for UnixStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnixStream")
            .field("fd", &self.inner.fd())
            .finish()
    }
}

/// A Unix-domain listening socket.
pub struct UnixListener {
    inner: Listener<std::os::unix::net::UnixListener>,
}

impl UnixListener {
    /// Binds to `path` and listens.
    pub fn bind(path: impl AsRef<Path>) -> io::Result<UnixListener> {
        UnixListener::from_std(std::os::unix::net::UnixListener::bind(path)?)
    }

    /// Wraps a bound, listening `std` listener (made non-blocking) on the reactor polling on
    /// this thread.
    ///
    /// # Errors
    /// No reactor on this thread; `fcntl` or the fd registration failing.
    pub fn from_std(l: std::os::unix::net::UnixListener) -> io::Result<UnixListener> {
        Ok(UnixListener {
            inner: Listener::new(l)?,
        })
    }

    /// Accepts a connection.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        Ok(UnixStream {
            inner: Stream::new(self.accept_std().await?)?,
        })
    }

    /// Accepts a connection as a non-blocking `std` socket, registered with no reactor (see
    /// [`TcpListener::accept_std`]).
    pub async fn accept_std(&self) -> io::Result<std::os::unix::net::UnixStream> {
        Ok(std::os::unix::net::UnixStream::from(
            self.inner.accept_fd().await?,
        ))
    }
}

impl fmt::Debug for UnixListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnixListener").finish()
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
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
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
