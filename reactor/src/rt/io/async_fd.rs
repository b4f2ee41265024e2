//! [`Async`]: an fd made non-blocking and registered with the reactor, with readiness futures
//! and `futures-io` `AsyncRead`/`AsyncWrite`.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::event_loop::{Reactor, Remote};
use crate::fd::handlers::{FdHandler, FdId};
use crate::fd::interest::Interest;
use crate::lockfree::sync::Arc;
use crate::rt::budget;
use crate::rt::no_reactor;
use crate::sched::handle::post_oneshot;
use crate::sys::cvt;

#[derive(Default)]
struct Dir {
    /// An event was seen and not yet consumed by a failed (`WouldBlock`) attempt.
    ready: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

struct Reg {
    id: Cell<Option<FdId>>,
    interest: Cell<Interest>,
    read: Dir,
    write: Dir,
}

impl Reg {
    fn set_interest(&self, r: &Reactor, interest: Interest) {
        if let Some(id) = self.id.get() {
            if self.interest.get() != interest && r.set_fd_interest(id, interest).is_ok() {
                self.interest.set(interest);
            }
        }
    }

    fn without(&self, r: &Reactor, dir: Interest) {
        let i = self.interest.get();
        let keep = match (dir.is_readable(), dir.is_writable()) {
            (true, _) => {
                if i.is_writable() {
                    Interest::WRITABLE
                } else {
                    Interest::NONE
                }
            }
            (_, true) => {
                if i.is_readable() {
                    Interest::READABLE
                } else {
                    Interest::NONE
                }
            }
            _ => i,
        };
        self.set_interest(r, keep);
    }
}

/// An fd registered with the current reactor, switched to non-blocking mode.
///
/// Readiness is level-triggered underneath and consumed by failed attempts: an operation is
/// tried first, and only a `WouldBlock` makes the task wait (with the fd's interest switched on
/// until the event arrives). Use [`read_with`](Self::read_with)/[`write_with`](Self::write_with)
/// for any non-blocking call, [`readable`](Self::readable)/[`writable`](Self::writable) to
/// wait, or the `futures-io` traits for byte streams (pipes, sockets).
///
/// The fd is removed from the reactor before `T` is dropped (closed). `Async` must be created
/// on a reactor's thread while that reactor is polling (in a task or `block_on`), or with
/// [`new_in`](Self::new_in).
///
/// ```
/// use futures_io::{AsyncRead, AsyncWrite};
/// use reactor::{Async, Reactor};
/// use std::os::unix::net::UnixStream;
///
/// let r = Reactor::new()?;
/// let (a, b) = UnixStream::pair()?;
/// let got = r.block_on(async move {
///     let a = Async::new(a)?;
///     let b = Async::new(b)?;
///     b.write_with(|s| std::io::Write::write(&mut &*s, b"ping")).await?;
///     let mut buf = [0u8; 4];
///     let n = a.read_with(|s| std::io::Read::read(&mut &*s, &mut buf)).await?;
///     std::io::Result::Ok(buf[..n].to_vec())
/// })?;
/// assert_eq!(got, b"ping");
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Async<T: AsFd + 'static> {
    io: Option<T>,
    reg: Rc<Reg>,
    shared: Arc<Remote>,
}

impl<T: AsFd + 'static> Async<T> {
    /// Registers `io` with the reactor polling on this thread.
    ///
    /// # Errors
    /// No reactor is polling on this thread; or as [`new_in`](Self::new_in).
    pub fn new(io: T) -> io::Result<Async<T>> {
        Reactor::with_current(|r| Self::new_in(r, io)).unwrap_or_else(|| Err(no_reactor()))
    }

    /// Registers `io` with `r`.
    ///
    /// # Errors
    /// `fcntl` failing to make it non-blocking; `add_fd`'s errors (`EPERM` for regular files,
    /// `EEXIST` if already registered).
    pub fn new_in(r: &Reactor, io: T) -> io::Result<Async<T>> {
        let fd = io.as_fd().as_raw_fd();
        set_nonblocking(fd)?;
        let reg = Rc::new(Reg {
            id: Cell::new(None),
            interest: Cell::new(Interest::NONE),
            read: Dir {
                ready: Cell::new(true),
                ..Dir::default()
            },
            write: Dir {
                ready: Cell::new(true),
                ..Dir::default()
            },
        });
        let (rr, rw) = (reg.clone(), reg.clone());
        let handler = FdHandler::new()
            .on_read(move |r, _| {
                rr.read.ready.set(true);
                let w = rr.read.waker.borrow_mut().take();
                match w {
                    Some(w) => w.wake(),
                    // Nobody is waiting: stop watching, or a level-triggered fd with unread
                    // data would keep the reactor from sleeping.
                    None => rr.without(r, Interest::READABLE),
                }
            })
            .on_write(move |r, _| {
                rw.write.ready.set(true);
                let w = rw.write.waker.borrow_mut().take();
                if let Some(w) = w {
                    w.wake();
                }
                // Writable is the usual state of a socket: watch it only while a writer waits.
                rw.without(r, Interest::WRITABLE);
            })
            .with_interest(Interest::NONE);
        let id = r.add_fd(fd, handler)?;
        reg.id.set(Some(id));
        Ok(Async {
            io: Some(io),
            reg,
            shared: r.shared().clone(),
        })
    }

    /// The wrapped value.
    pub fn get_ref(&self) -> &T {
        self.io.as_ref().expect("present until drop")
    }

    /// Deregisters and returns the value (still non-blocking).
    pub fn into_inner(mut self) -> io::Result<T> {
        self.deregister()?;
        Ok(self.io.take().expect("present until drop"))
    }

    fn deregister(&self) -> io::Result<()> {
        let Some(id) = self.reg.id.take() else {
            return Ok(());
        };
        Reactor::with_current_for(&self.shared, |r| r.remove_fd(id))
            .unwrap_or_else(|| Err(no_reactor()))
    }

    fn fd(&self) -> RawFd {
        self.get_ref().as_fd().as_raw_fd()
    }

    fn poll_dir(&self, cx: &mut Context<'_>, dir: Interest) -> Poll<io::Result<()>> {
        let d = if dir.is_readable() {
            &self.reg.read
        } else {
            &self.reg.write
        };
        if d.ready.get() {
            return Poll::Ready(Ok(()));
        }
        {
            let mut w = d.waker.borrow_mut();
            match &*w {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        let want = self.reg.interest.get() | dir;
        let set = Reactor::with_current_for(&self.shared, |r| self.reg.set_interest(r, want));
        match set {
            Some(()) => Poll::Pending,
            None => Poll::Ready(Err(no_reactor())),
        }
    }

    /// Polls for read readiness (an event not yet consumed by a `WouldBlock`).
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_dir(cx, Interest::READABLE)
    }

    /// Polls for write readiness.
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_dir(cx, Interest::WRITABLE)
    }

    /// Waits until the fd is readable (or has an error or hang-up).
    pub fn readable(&self) -> Readable<'_, T> {
        Readable(self)
    }

    /// Waits until the fd is writable (or has an error).
    pub fn writable(&self) -> Writable<'_, T> {
        Writable(self)
    }

    /// Runs the non-blocking `op` until it does not return `WouldBlock`, waiting for read
    /// readiness in between (and first, if the last attempt found nothing to read).
    pub async fn read_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        budget::proceed().await;
        if !self.reg.read.ready.get() {
            self.readable().await?;
        }
        loop {
            match op(self.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.reg.read.ready.set(false);
                    self.readable().await?;
                }
                r => {
                    budget::spend(0);
                    return r;
                }
            }
        }
    }

    /// The last read found the fd drained: the next `read_with` waits for an event first.
    pub(crate) fn clear_read_ready(&self) {
        self.reg.read.ready.set(false);
    }

    /// Runs the non-blocking `op` until it does not return `WouldBlock`, waiting for write
    /// readiness in between.
    pub async fn write_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        budget::proceed().await;
        loop {
            match op(self.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.reg.write.ready.set(false);
                    self.writable().await?;
                }
                r => {
                    budget::spend(0);
                    return r;
                }
            }
        }
    }

    /// `read(2)` into `buf`, waiting as needed (the `AsyncRead` path, without `Pin`).
    pub(crate) fn poll_read_fd(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(budget::poll_proceed(cx));
        loop {
            if !self.reg.read.ready.get() {
                std::task::ready!(self.poll_readable(cx))?;
            }
            // SAFETY: writes at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let e = match cvt(n) {
                Ok(n) => {
                    if (n as usize) < buf.len() {
                        // Drained: the next read waits for an event first (see `Op::drained`).
                        self.reg.read.ready.set(false);
                    }
                    budget::spend(n as usize);
                    return Poll::Ready(Ok(n as usize));
                }
                Err(e) => e,
            };
            match e.kind() {
                io::ErrorKind::WouldBlock => self.reg.read.ready.set(false),
                io::ErrorKind::Interrupted => {}
                _ => {
                    budget::spend(0);
                    return Poll::Ready(Err(e));
                }
            }
        }
    }

    /// `write(2)` from `buf`, waiting as needed.
    pub(crate) fn poll_write_fd(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(budget::poll_proceed(cx));
        loop {
            if !self.reg.write.ready.get() {
                std::task::ready!(self.poll_writable(cx))?;
            }
            // SAFETY: reads at most `buf.len()` bytes from `buf`.
            let n = unsafe { libc::write(self.fd(), buf.as_ptr().cast(), buf.len()) };
            let e = match cvt(n) {
                Ok(n) => {
                    budget::spend(n as usize);
                    return Poll::Ready(Ok(n as usize));
                }
                Err(e) => e,
            };
            match e.kind() {
                io::ErrorKind::WouldBlock => self.reg.write.ready.set(false),
                io::ErrorKind::Interrupted => {}
                _ => {
                    budget::spend(0);
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a borrowed fd, no pointers.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    Ok(())
}

impl<T: AsFd + 'static> Drop for Async<T> {
    fn drop(&mut self) {
        let Some(id) = self.reg.id.take() else { return };
        let io = self.io.take();
        let removed = Reactor::with_current_for(&self.shared, |r| {
            let _ = r.remove_fd(id);
        });
        if removed.is_none() {
            // Off the reactor's poll: remove the registration on the reactor's thread (this
            // one: `Async` is not `Send`) before the fd is closed, so the fd stays open until then.
            let deferred = move |r: &Reactor| {
                let _ = r.remove_fd(id);
                drop(io);
            };
            let _ = post_oneshot(
                &self.shared,
                crate::sched::bh::Kind::OneShot,
                crate::sched::clock::DISARMED,
                crate::sched::bh::Callback::Once(Box::new(deferred)),
            );
            return;
        }
        drop(io);
    }
}

impl<T: AsFd + 'static> AsFd for Async<T> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.get_ref().as_fd()
    }
}

impl<T: AsFd + fmt::Debug + 'static> fmt::Debug for Async<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Async").field("io", &self.io).finish()
    }
}

/// The future of [`Async::readable`].
#[must_use = "futures do nothing unless polled"]
pub struct Readable<'a, T: AsFd + 'static>(&'a Async<T>);

impl<T: AsFd + 'static> Future for Readable<'_, T> {
    type Output = io::Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_readable(cx)
    }
}

/// The future of [`Async::writable`].
#[must_use = "futures do nothing unless polled"]
pub struct Writable<'a, T: AsFd + 'static>(&'a Async<T>);

impl<T: AsFd + 'static> Future for Writable<'_, T> {
    type Output = io::Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_writable(cx)
    }
}

impl<T: AsFd + 'static> futures_io::AsyncRead for Async<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_read_fd(cx, buf)
    }
}

impl<T: AsFd + 'static> futures_io::AsyncWrite for Async<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_fd(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
