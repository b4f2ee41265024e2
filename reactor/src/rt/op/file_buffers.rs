//! Reads and writes of other buffer shapes: several buffers in one call (`preadv`/`pwritev`)
//! and registered buffers (`READ_FIXED`/`WRITE_FIXED`).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::squeue::Entry;
use io_uring::{opcode, types};

use super::{Op, len32};
use crate::io::{IoBuf, IoBufMut};
use crate::rt::fixed::FixedBuf;
use crate::sched::lane::Lane;
use crate::sys::cvt;

use super::file::{FileFd, ReadAt, WriteAt};

/// What `preadv` and `pwritev` share: the file, the buffers, the offset, and the iovecs.
pub(crate) struct Vectored<B> {
    fd: Arc<FileFd>,
    bufs: Vec<B>,
    offset: u64,
    /// Built from `bufs` when the operation starts; its heap block is what the kernel reads.
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs only point into the buffers this operation owns, which move with it.
unsafe impl<B: Send> Send for Vectored<B> {}

impl<B> Vectored<B> {
    pub(crate) fn new(fd: Arc<FileFd>, bufs: Vec<B>, offset: u64) -> Self {
        Vectored {
            fd,
            bufs,
            offset,
            iov: Vec::new(),
        }
    }

    /// Builds the iovecs, one per buffer, with `iovec`.
    fn fill_iov(&mut self, iovec: impl FnMut(&mut B) -> libc::iovec) {
        self.iov = self.bufs.iter_mut().map(iovec).collect();
    }

    /// `READV` or `WRITEV` of the iovecs.
    fn sqe(&self, write: bool) -> Entry {
        let (fd, iov, n) = (
            types::Fd(self.fd.as_raw_fd()),
            self.iov.as_ptr(),
            len32(self.iov.len()),
        );
        if write {
            opcode::Writev::new(fd, iov, n).offset(self.offset).build()
        } else {
            opcode::Readv::new(fd, iov, n).offset(self.offset).build()
        }
    }

    /// The blocking `preadv` or `pwritev` of the iovecs (a write runs as the file's blocking
    /// writes do: `FileFd::blocking_write`).
    fn call(&self, write: bool) -> io::Result<usize> {
        let (fd, iov, offset) = (self.fd.as_raw_fd(), &self.iov, self.offset as i64);
        let cnt = iov.len() as i32;
        if !write {
            // SAFETY: the iovecs (owned, in a Vec's heap block) cover the buffers' rooms,
            // which the operation owns; the Arc keeps the fd open. The caller checked the
            // count against IOV_MAX.
            return cvt(unsafe { libc::preadv(fd, iov.as_ptr(), cnt, offset) }).map(|n| n as usize);
        }
        let len = iov.iter().map(|v| v.iov_len).sum();
        self.fd.blocking_write(len, || {
            // SAFETY: as for the read, over the buffers' initialised bytes (only read).
            cvt(unsafe { libc::pwritev(fd, iov.as_ptr(), cnt, offset) }).map(|n| n as usize)
        })
    }
}

/// `preadv`: into the rooms of `bufs`, in order.
pub(crate) struct ReadvAt<B>(pub(crate) Vectored<B>);

impl<B: IoBufMut> ReadvAt<B> {
    fn fill_iov(&mut self) {
        self.0.fill_iov(|b| libc::iovec {
            iov_base: b.stable_mut_ptr().cast(),
            iov_len: b.bytes_total(),
        });
    }
}

// SAFETY: the iovecs cover the buffers' rooms, which the operation owns (see `Vectored`); the
// Arc keeps the fd open.
unsafe impl<B: IoBufMut> Op for ReadvAt<B> {
    type Output = (io::Result<usize>, Vec<B>);

    fn sqe(&mut self) -> Entry {
        self.fill_iov();
        self.0.sqe(false)
    }

    fn call(&mut self) -> io::Result<usize> {
        self.fill_iov();
        self.0.call(false)
    }

    fn call_nowait(&mut self) -> Option<io::Result<usize>> {
        self.fill_iov();
        self.0.fd.try_nowait(&self.0.iov, self.0.offset, false)
    }

    fn complete(mut self, res: io::Result<usize>) -> Self::Output {
        if let Ok(mut n) = res {
            for b in &mut self.0.bufs {
                let k = n.min(b.bytes_total());
                // SAFETY: the kernel filled the buffers in order, `k` bytes of this one.
                unsafe { b.set_init(k) };
                n -= k;
            }
        }
        (res, self.0.bufs)
    }
}

/// `pwritev`: the initialised bytes of `bufs`, in order.
pub(crate) struct WritevAt<B>(pub(crate) Vectored<B>);

impl<B: IoBuf> WritevAt<B> {
    fn fill_iov(&mut self) {
        self.0.fill_iov(|b| libc::iovec {
            iov_base: b.stable_ptr().cast_mut().cast(),
            iov_len: b.bytes_init(),
        });
    }
}

// SAFETY: as for `ReadvAt`, over the buffers' initialised bytes (only read).
unsafe impl<B: IoBuf> Op for WritevAt<B> {
    type Output = (io::Result<usize>, Vec<B>);

    fn sqe(&mut self) -> Entry {
        self.fill_iov();
        self.0.sqe(true)
    }

    fn call(&mut self) -> io::Result<usize> {
        self.fill_iov();
        self.0.call(true)
    }

    fn call_inline(&mut self) -> Option<io::Result<usize>> {
        let len = self.0.bufs.iter().map(|b| b.bytes_init()).sum();
        self.0
            .fd
            .write_inline_now(self.0.offset, len)
            .then(|| self.call())
    }

    fn call_nowait(&mut self) -> Option<io::Result<usize>> {
        if !self.0.fd.nowait_writes() {
            // Not worth building the iovecs (`call` builds them).
            return None;
        }
        self.fill_iov();
        self.0.fd.try_nowait(&self.0.iov, self.0.offset, true)
    }

    fn prefers_pool(&self) -> bool {
        self.0.fd.writes_punted_by_the_ring()
    }

    fn pool_lane(&self) -> Option<&Lane> {
        self.0.fd.write_lane()
    }

    fn complete(self, res: io::Result<usize>) -> Self::Output {
        (res, self.0.bufs)
    }
}

/// A read into a registered buffer: `READ_FIXED` naming it by index when `fixed` (its pool is
/// registered with the ring this runs on), else exactly [`ReadAt`].
pub(crate) struct ReadAtFixed {
    pub(crate) read: ReadAt<FixedBuf>,
    pub(crate) fixed: bool,
}

// SAFETY: as for `ReadAt`; with `fixed`, the kernel also checks that the range lies inside the
// registered buffer the index names, which is this buffer.
unsafe impl Op for ReadAtFixed {
    type Output = (io::Result<usize>, FixedBuf);

    fn sqe(&mut self) -> Entry {
        if !self.fixed {
            return self.read.sqe();
        }
        let r = &mut self.read;
        let (len, index) = (len32(r.buf.bytes_total()), r.buf.index());
        opcode::ReadFixed::new(
            types::Fd(r.fd.as_raw_fd()),
            r.buf.stable_mut_ptr(),
            len,
            index,
        )
        .offset(r.offset)
        .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        self.read.call()
    }

    fn call_nowait(&mut self) -> Option<io::Result<usize>> {
        self.read.call_nowait()
    }

    fn complete(self, res: io::Result<usize>) -> Self::Output {
        self.read.complete(res)
    }
}

/// A write from a registered buffer: `WRITE_FIXED` when `fixed`, else exactly [`WriteAt`].
pub(crate) struct WriteAtFixed {
    pub(crate) write: WriteAt<FixedBuf>,
    pub(crate) fixed: bool,
}

// SAFETY: as for `ReadAtFixed`, for the buffer's initialised bytes (only read).
unsafe impl Op for WriteAtFixed {
    type Output = (io::Result<usize>, FixedBuf);

    fn sqe(&mut self) -> Entry {
        if !self.fixed {
            return self.write.sqe();
        }
        let w = &self.write;
        let (len, index) = (len32(w.buf.bytes_init()), w.buf.index());
        opcode::WriteFixed::new(types::Fd(w.fd.as_raw_fd()), w.buf.stable_ptr(), len, index)
            .offset(w.offset)
            .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        self.write.call()
    }

    fn call_nowait(&mut self) -> Option<io::Result<usize>> {
        self.write.call_nowait()
    }

    fn call_inline(&mut self) -> Option<io::Result<usize>> {
        self.write.call_inline()
    }

    fn prefers_pool(&self) -> bool {
        self.write.prefers_pool()
    }

    fn pool_lane(&self) -> Option<&Lane> {
        self.write.pool_lane()
    }

    fn complete(self, res: io::Result<usize>) -> Self::Output {
        self.write.complete(res)
    }
}
