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

use crate::io::{IoBuf, IoBufMut};
use crate::rt::op::in_order::Dir;
use crate::rt::op::socket::Connect;
use crate::rt::op::{Ready, run_when_ready};
use crate::sys::cvt;

pub use crate::event_loop::SocketIo;

mod stream;

use stream::{Listener, Stream, sockaddr};

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
