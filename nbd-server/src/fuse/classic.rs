//! The classic FUSE transport: requests read from `/dev/fuse` (or a clone of it, one per
//! IoThread) through the reactor's readiness, replies written back with `writev`. Runs on
//! both backends. With the io_uring transport it still carries what the kernel never puts on
//! the ring (INTERRUPT, FORGET) and the requests that come before every ring queue is armed.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

use super::abi::{self, Pod, op};
use super::fs::{Fs, Reply, has_reply};
use crate::direct::AlignedPool;

/// Requests one reader serves at once; past that it stops reading until one finishes (and
/// the kernel keeps the rest queued).
pub(crate) const MAX_IN_FLIGHT: usize = 32;

/// One reader's state, shared with its requests' tasks.
struct Reader {
    fs: Arc<Fs>,
    dev: reactor::Async<OwnedFd>,
    /// Buffers of `buf_size` bytes, kept for reuse (at most [`MAX_IN_FLIGHT`]).
    bufs: RefCell<Vec<Vec<u8>>>,
    buf_size: usize,
    in_flight: Cell<usize>,
    /// The reader waits here for room.
    room: RefCell<Option<std::task::Waker>>,
    pool: AlignedPool,
}

/// Serves the connection on `dev` (a non-blocking `/dev/fuse` fd or clone) on the current
/// reactor until the kernel ends it (`ENODEV`: unmounted or aborted). `buf_size` is the read
/// buffer's size (at least the negotiated `max_write` plus its headers).
///
/// # Errors
/// A read error other than the ones that mean "try again" or "the connection ended".
pub(crate) async fn serve(fs: Arc<Fs>, dev: OwnedFd, buf_size: usize) -> io::Result<()> {
    let dev = reactor::Async::new(dev)?;
    let me = Rc::new(Reader {
        fs,
        dev,
        bufs: RefCell::new(Vec::new()),
        buf_size,
        in_flight: Cell::new(0),
        room: RefCell::new(None),
        pool: AlignedPool::default(),
    });
    let res = me.clone().read_loop().await;
    // The requests in flight finish (their replies may find the connection gone).
    std::future::poll_fn(|cx| {
        if me.in_flight.get() == 0 {
            std::task::Poll::Ready(())
        } else {
            *me.room.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        }
    })
    .await;
    res
}

impl Reader {
    async fn read_loop(self: Rc<Self>) -> io::Result<()> {
        loop {
            // Room for one more request.
            std::future::poll_fn(|cx| {
                if self.in_flight.get() < MAX_IN_FLIGHT {
                    std::task::Poll::Ready(())
                } else {
                    *self.room.borrow_mut() = Some(cx.waker().clone());
                    std::task::Poll::Pending
                }
            })
            .await;
            let mut buf = self.bufs.borrow_mut().pop().unwrap_or_default();
            buf.clear();
            buf.reserve_exact(self.buf_size);
            let res = self
                .dev
                .read_with(|fd| {
                    // SAFETY: reads at most the buffer's capacity into its spare room.
                    let n = unsafe {
                        libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.capacity())
                    };
                    if n < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(n as usize)
                })
                .await;
            let n = match res {
                Ok(n) => n,
                Err(e) => match e.raw_os_error() {
                    // Interrupted, or a request that was aborted before it could be read.
                    Some(libc::EINTR | libc::ENOENT) => {
                        self.bufs.borrow_mut().push(buf);
                        continue;
                    }
                    // Unmounted or aborted: the connection is over.
                    Some(libc::ENODEV) => return Ok(()),
                    _ => return Err(e),
                },
            };
            // SAFETY: the kernel wrote `n <= capacity` bytes.
            unsafe { buf.set_len(n) };
            self.dispatch(buf);
        }
    }

    /// Handles one request read into `buf`: the ones without work at once, the rest as a
    /// task of their own.
    fn dispatch(self: &Rc<Self>, buf: Vec<u8>) {
        let Some(h) = abi::InHeader::read(&buf) else {
            // Shorter than a header: the kernel never sends that.
            self.bufs.borrow_mut().push(buf);
            return;
        };
        let args_at = std::mem::size_of::<abi::InHeader>();
        match h.opcode {
            op::FORGET | op::BATCH_FORGET => {
                self.bufs.borrow_mut().push(buf);
                return;
            }
            op::INTERRUPT => {
                if let Some(i) = abi::InterruptIn::read(&buf[args_at..]) {
                    self.fs.interrupts.mark(i.unique);
                }
                self.bufs.borrow_mut().push(buf);
                return;
            }
            _ => {}
        }
        // The opcode's first argument, copied out of the buffer the work takes over; a
        // WRITE's data follows it.
        let mut arg = [0u8; abi::uring::OP_IN_SIZE];
        let arg_len = first_arg_len(h.opcode).min(buf.len() - args_at);
        arg[..arg_len].copy_from_slice(&buf[args_at..args_at + arg_len]);
        let data = args_at + arg_len..buf.len();
        self.in_flight.set(self.in_flight.get() + 1);
        let me = self.clone();
        let task = async move {
            let (reply, buf) = me.fs.serve(&h, &arg[..arg_len], buf, data, &me.pool).await;
            if has_reply(h.opcode) {
                me.reply(h.unique, reply, &buf);
            }
            if me.bufs.borrow().len() < MAX_IN_FLIGHT {
                me.bufs.borrow_mut().push(buf);
            }
            me.in_flight.set(me.in_flight.get() - 1);
            if let Some(w) = me.room.borrow_mut().take() {
                w.wake();
            }
        };
        reactor::Reactor::with_current(|r| r.spawn_local(task).detach())
            .expect("dispatch runs in the reader's task, on its reactor");
    }

    /// Writes the reply to request `unique`; a request that is gone (`ENOENT`: interrupted
    /// and answered, or aborted) or a connection that is gone (`ENODEV`) takes no reply.
    fn reply(&self, unique: u64, reply: Reply, buf: &[u8]) {
        write_reply(self.dev.get_ref(), unique, reply, buf);
    }
}

/// Writes a reply on a `/dev/fuse` fd (writes to it never block).
pub(crate) fn write_reply(dev: &OwnedFd, unique: u64, reply: Reply, buf: &[u8]) {
    let len = if reply.error == 0 { reply.len } else { 0 };
    let out = abi::OutHeader {
        len: (std::mem::size_of::<abi::OutHeader>() + len) as u32,
        error: -reply.error,
        unique,
    };
    let iov = [
        libc::iovec {
            iov_base: out.bytes().as_ptr() as *mut _,
            iov_len: out.bytes().len(),
        },
        libc::iovec {
            iov_base: buf.as_ptr() as *mut _,
            iov_len: len,
        },
    ];
    // SAFETY: two iovecs over live memory, read during the call.
    let n = unsafe { libc::writev(dev.as_raw_fd(), iov.as_ptr(), 2) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) {
            tracing::warn!(error = %e, unique, "fuse: a reply was refused");
        }
    }
}

/// The size of each opcode's first argument (the fixed part before any data).
pub(crate) fn first_arg_len(opcode: u32) -> usize {
    use std::mem::size_of;
    match opcode {
        op::GETATTR => size_of::<abi::GetattrIn>(),
        op::SETATTR => size_of::<abi::SetattrIn>(),
        op::OPEN => size_of::<abi::OpenIn>(),
        op::RELEASE => size_of::<abi::ReleaseIn>(),
        op::READ => size_of::<abi::ReadIn>(),
        op::WRITE => size_of::<abi::WriteIn>(),
        op::FSYNC => size_of::<abi::FsyncIn>(),
        op::FLUSH => 24,
        op::FALLOCATE => size_of::<abi::FallocateIn>(),
        op::LSEEK => size_of::<abi::LseekIn>(),
        op::INTERRUPT => size_of::<abi::InterruptIn>(),
        _ => 0,
    }
}
