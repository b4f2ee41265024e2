//! The socket operations: one type each, with its io_uring SQE and its non-blocking call.
//!
//! Each keeps the socket open with the `Rc<Async<_>>` it shares with its stream or listener,
//! and owns its buffer until it completes. A stream's receives and sends also own their
//! stream's [`InFlight`] guard (`in_order.rs`): what one does after its future was dropped
//! (bytes received, bytes sent) is kept with the stream, not lost.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use io_uring::squeue::Entry;
use io_uring::{opcode, types};

use super::in_order::InFlight;
use super::{Op, len32};
use crate::io::{Async, IoBuf, IoBufMut};
use crate::sys::cvt;

/// `recv` into the room of `buf`, as the stream's one read in flight (`turn`).
pub(crate) struct Recv<T: AsFd + 'static, B> {
    pub(crate) io: Rc<Async<T>>,
    pub(crate) buf: B,
    pub(crate) turn: InFlight,
}

impl<T: AsFd + 'static, B> Recv<T, B> {
    fn fd(&self) -> RawFd {
        self.io.as_fd().as_raw_fd()
    }
}

// SAFETY: at most `bytes_total` bytes are written at the buffer's stable pointer; the Rc keeps
// the socket open.
unsafe impl<T: AsFd + 'static, B: IoBufMut> Op for Recv<T, B> {
    type Output = (io::Result<usize>, B);

    fn sqe(&mut self) -> Entry {
        let len = len32(self.buf.bytes_total());
        opcode::Recv::new(types::Fd(self.fd()), self.buf.stable_mut_ptr(), len).build()
    }

    fn call(&mut self) -> io::Result<usize> {
        let (ptr, len) = (self.buf.stable_mut_ptr(), self.buf.bytes_total());
        // SAFETY: the kernel writes at most `len` bytes into the buffer's room.
        cvt(unsafe { libc::recv(self.fd(), ptr.cast(), len, 0) }).map(|n| n as usize)
    }

    fn drained(&self, n: usize) -> bool {
        n < self.buf.bytes_total()
    }

    fn complete(mut self, res: io::Result<usize>) -> Self::Output {
        if let Ok(n) = res {
            // SAFETY: `n` bytes were received into the room.
            unsafe { self.buf.set_init(n) };
        }
        (res, self.buf)
    }

    /// The bytes were taken from the socket but nobody collected them: the stream's next
    /// read returns them.
    fn orphan(mut self, n: usize) {
        let ptr = self.buf.stable_mut_ptr();
        // SAFETY: the kernel wrote `n` bytes (at most the room) at the buffer's stable pointer,
        // which the operation still owns.
        let got = unsafe { std::slice::from_raw_parts(ptr.cast_const(), n) };
        self.turn.shared().hold(got);
    }
}

/// `send` of the initialised bytes of `buf` (never raising `SIGPIPE`), as the stream's one
/// write in flight (`turn`). (Not `Send`: that name is the marker trait's.)
pub(crate) struct SendOp<T: AsFd + 'static, B> {
    pub(crate) io: Rc<Async<T>>,
    pub(crate) buf: B,
    pub(crate) turn: InFlight,
}

impl<T: AsFd + 'static, B> SendOp<T, B> {
    fn fd(&self) -> RawFd {
        self.io.as_fd().as_raw_fd()
    }
}

// SAFETY: at most `bytes_init` bytes are read at the buffer's stable pointer; the Rc keeps the
// socket open.
unsafe impl<T: AsFd + 'static, B: IoBuf> Op for SendOp<T, B> {
    type Output = (io::Result<usize>, B);

    fn sqe(&mut self) -> Entry {
        let len = len32(self.buf.bytes_init());
        opcode::Send::new(types::Fd(self.fd()), self.buf.stable_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        let (ptr, len) = (self.buf.stable_ptr(), self.buf.bytes_init());
        // SAFETY: the kernel reads `len` initialised bytes.
        cvt(unsafe { libc::send(self.fd(), ptr.cast(), len, libc::MSG_NOSIGNAL) })
            .map(|n| n as usize)
    }

    fn complete(self, res: io::Result<usize>) -> Self::Output {
        if let Ok(n) = res {
            self.turn.shared().count_sent(n);
        }
        (res, self.buf)
    }

    /// The bytes went out though nobody collected the result: the stream counts them
    /// (`bytes_sent`).
    fn orphan(self, n: usize) {
        self.turn.shared().count_sent(n);
    }
}

/// `accept4` of a connection as a non-blocking, close-on-exec socket (its address unasked).
pub(crate) struct Accept<T: AsFd + 'static> {
    pub(crate) io: Rc<Async<T>>,
}

// SAFETY: refers to no memory (no address buffer); the Rc keeps the listener open.
unsafe impl<T: AsFd + 'static> Op for Accept<T> {
    type Output = io::Result<OwnedFd>;

    fn sqe(&mut self) -> Entry {
        opcode::Accept::new(
            types::Fd(self.io.as_fd().as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
        .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        // SAFETY: accept4 without an address buffer.
        cvt(unsafe {
            libc::accept4(
                self.io.as_fd().as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        })
        .map(|fd| fd as usize)
    }

    fn moved(&self, _fd: usize) -> usize {
        0
    }

    fn complete(self, res: io::Result<usize>) -> io::Result<OwnedFd> {
        // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
        res.map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    fn orphan(self, fd: usize) {
        // SAFETY: the kernel gave this fd to an operation nobody collected.
        drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
}

/// `connect` of a non-blocking socket. On io_uring, one `CONNECT` operation; by readiness, the
/// first call starts the connection (`EINPROGRESS` reads as "not ready yet") and the calls
/// made when the socket is writable collect its outcome.
pub(crate) struct Connect<T: AsFd + 'static> {
    io: Rc<Async<T>>,
    /// Boxed: the kernel reads the address where it is.
    addr: Box<libc::sockaddr_storage>,
    len: libc::socklen_t,
    started: bool,
}

impl<T: AsFd + 'static> Connect<T> {
    pub(crate) fn new(
        io: Rc<Async<T>>,
        addr: libc::sockaddr_storage,
        len: libc::socklen_t,
    ) -> Self {
        Connect {
            io,
            addr: Box::new(addr),
            len,
            started: false,
        }
    }

    fn fd(&self) -> RawFd {
        self.io.as_fd().as_raw_fd()
    }

    /// After writability: the connection's outcome, or `WouldBlock` if it is still under way
    /// (a spurious wakeup).
    fn outcome(&self) -> io::Result<usize> {
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `err` and `len` are valid for the call and sized for SO_ERROR's int.
        cvt(unsafe {
            libc::getsockopt(
                self.fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut err).cast(),
                &mut len,
            )
        })?;
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
        // SAFETY: an all-zero sockaddr_storage is a valid out-buffer.
        let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut plen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `peer` has room for `plen` bytes.
        match cvt(unsafe { libc::getpeername(self.fd(), (&raw mut peer).cast(), &mut plen) }) {
            Ok(_) => Ok(0),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) => Err(e),
        }
    }
}

// SAFETY: the SQE and the call read the boxed address (`len` bytes of it), which the operation
// owns; the Rc keeps the socket open.
unsafe impl<T: AsFd + 'static> Op for Connect<T> {
    type Output = io::Result<()>;

    fn sqe(&mut self) -> Entry {
        opcode::Connect::new(
            types::Fd(self.fd()),
            (&raw const *self.addr).cast(),
            self.len,
        )
        .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        if self.started {
            return self.outcome();
        }
        self.started = true;
        // SAFETY: the address holds `len` valid bytes.
        let rc = unsafe { libc::connect(self.fd(), (&raw const *self.addr).cast(), self.len) };
        match cvt(rc) {
            Ok(_) => Ok(0),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) => Err(e),
        }
    }

    fn moved(&self, _n: usize) -> usize {
        0
    }

    fn complete(self, res: io::Result<usize>) -> io::Result<()> {
        res.map(drop)
    }
}
