//! The file operations: one type each, with its io_uring SQE and its blocking call.
//!
//! Each keeps the file open with an `Arc<FileFd>` and owns its buffers until it completes.
//! Reads and writes also have a non-blocking form ([`Op::call_nowait`], `RWF_NOWAIT`), which
//! both backends try on the loop thread first: what the page cache holds is copied at once,
//! and only the rest goes to the ring or the thread pool.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::squeue::Entry;
use io_uring::{opcode, types};

use super::file_fd::FileFd;
use super::{Op, len32};
use crate::io::{IoBuf, IoBufMut};
use crate::rt::fixed::FixedBuf;
use crate::sched::lane::Lane;
use crate::sys::cvt;

/// `openat(AT_FDCWD, path, flags, mode)`.
pub(crate) struct Open {
    pub(crate) path: CString,
    pub(crate) flags: i32,
    pub(crate) mode: u32,
}

// SAFETY: the SQE and the call refer to the path, which the operation owns (a CString's bytes
// do not move with it).
unsafe impl Op for Open {
    type Output = io::Result<OwnedFd>;

    fn sqe(&mut self) -> Entry {
        opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), self.path.as_ptr())
            .flags(self.flags)
            .mode(self.mode)
            .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        // SAFETY: a valid C string for the call.
        cvt(unsafe { libc::open(self.path.as_ptr(), self.flags, self.mode) }).map(|fd| fd as usize)
    }

    fn moved(&self, _fd: usize) -> usize {
        0
    }

    fn complete(self, res: io::Result<usize>) -> io::Result<OwnedFd> {
        // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
        res.map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    fn orphan(self, fd: usize) {
        // SAFETY: the kernel gave this fd to an operation nobody collected; nothing else owns
        // it.
        drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
}

/// `pread`: into the room of `buf`.
pub(crate) struct ReadAt<B> {
    pub(crate) fd: Arc<FileFd>,
    pub(crate) buf: B,
    pub(crate) offset: u64,
}

// SAFETY: at most `bytes_total` bytes are written at the buffer's stable pointer; the Arc keeps
// the fd open.
unsafe impl<B: IoBufMut> Op for ReadAt<B> {
    type Output = (io::Result<usize>, B);

    fn sqe(&mut self) -> Entry {
        let len = len32(self.buf.bytes_total());
        opcode::Read::new(
            types::Fd(self.fd.as_raw_fd()),
            self.buf.stable_mut_ptr(),
            len,
        )
        .offset(self.offset)
        .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        let (ptr, len) = (self.buf.stable_mut_ptr(), self.buf.bytes_total());
        // SAFETY: the kernel writes at most `len` bytes into the buffer's room; the offset was
        // checked to fit an off_t.
        cvt(unsafe { libc::pread(self.fd.as_raw_fd(), ptr.cast(), len, self.offset as i64) })
            .map(|n| n as usize)
    }

    fn call_nowait(&mut self) -> Option<io::Result<usize>> {
        let iov = [libc::iovec {
            iov_base: self.buf.stable_mut_ptr().cast(),
            iov_len: self.buf.bytes_total(),
        }];
        self.fd.try_nowait(&iov, self.offset, false)
    }

    fn complete(mut self, res: io::Result<usize>) -> Self::Output {
        if let Ok(n) = res {
            // SAFETY: the kernel initialised `n` bytes of the room.
            unsafe { self.buf.set_init(n) };
        }
        (res, self.buf)
    }
}

/// `pwrite`: the initialised bytes of `buf`.
pub(crate) struct WriteAt<B> {
    pub(crate) fd: Arc<FileFd>,
    pub(crate) buf: B,
    pub(crate) offset: u64,
}

// SAFETY: at most `bytes_init` bytes are read at the buffer's stable pointer; the Arc keeps the
// fd open.
unsafe impl<B: IoBuf> Op for WriteAt<B> {
    type Output = (io::Result<usize>, B);

    fn sqe(&mut self) -> Entry {
        let len = len32(self.buf.bytes_init());
        opcode::Write::new(types::Fd(self.fd.as_raw_fd()), self.buf.stable_ptr(), len)
            .offset(self.offset)
            .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        let (ptr, len) = (self.buf.stable_ptr(), self.buf.bytes_init());
        let (fd, offset) = (self.fd.as_raw_fd(), self.offset as i64);
        self.fd.blocking_write(len, || {
            // SAFETY: the kernel reads `len` initialised bytes; the offset fits an off_t.
            cvt(unsafe { libc::pwrite(fd, ptr.cast(), len, offset) }).map(|n| n as usize)
        })
    }

    fn call_inline(&mut self) -> Option<io::Result<usize>> {
        self.fd
            .write_inline_now(self.offset, self.buf.bytes_init())
            .then(|| self.call())
    }

    fn call_nowait(&mut self) -> Option<io::Result<usize>> {
        let iov = [libc::iovec {
            iov_base: self.buf.stable_ptr().cast_mut().cast(),
            iov_len: self.buf.bytes_init(),
        }];
        self.fd.try_nowait(&iov, self.offset, true)
    }

    fn prefers_pool(&self) -> bool {
        self.fd.writes_punted_by_the_ring()
    }

    fn pool_lane(&self) -> Option<&Lane> {
        self.fd.write_lane()
    }

    fn complete(self, res: io::Result<usize>) -> Self::Output {
        (res, self.buf)
    }
}

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

/// `fsync`, or `fdatasync` when `data_only`.
pub(crate) struct Fsync {
    pub(crate) fd: Arc<FileFd>,
    pub(crate) data_only: bool,
}

// SAFETY: refers to no memory; the Arc keeps the fd open.
unsafe impl Op for Fsync {
    type Output = io::Result<()>;

    fn sqe(&mut self) -> Entry {
        let flags = if self.data_only {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        opcode::Fsync::new(types::Fd(self.fd.as_raw_fd()))
            .flags(flags)
            .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: plain system calls on an open fd.
        let rc = unsafe {
            if self.data_only {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        };
        cvt(rc).map(|_| 0)
    }

    fn complete(self, res: io::Result<usize>) -> io::Result<()> {
        res.map(drop)
    }
}

/// `fallocate(fd, mode, offset, len)`.
pub(crate) struct Fallocate {
    pub(crate) fd: Arc<FileFd>,
    pub(crate) mode: i32,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

// SAFETY: refers to no memory; the Arc keeps the fd open.
unsafe impl Op for Fallocate {
    type Output = io::Result<()>;

    fn sqe(&mut self) -> Entry {
        opcode::Fallocate::new(types::Fd(self.fd.as_raw_fd()), self.len)
            .offset(self.offset)
            .mode(self.mode)
            .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        // SAFETY: a plain system call on an open fd; offset and length were checked to fit.
        let rc = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                self.mode,
                self.offset as i64,
                self.len as i64,
            )
        };
        cvt(rc).map(|_| 0)
    }

    fn complete(self, res: io::Result<usize>) -> io::Result<()> {
        res.map(drop)
    }
}

/// `posix_fadvise(fd, offset, len, advice)`.
pub(crate) struct Fadvise {
    pub(crate) fd: Arc<FileFd>,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) advice: i32,
}

// SAFETY: refers to no memory; the Arc keeps the fd open.
unsafe impl Op for Fadvise {
    type Output = io::Result<()>;

    fn sqe(&mut self) -> Entry {
        opcode::Fadvise::new(
            types::Fd(self.fd.as_raw_fd()),
            libc::off_t::from(self.len),
            self.advice,
        )
        .offset(self.offset)
        .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        // SAFETY: a plain system call on an open fd; the offset was checked to fit.
        let rc = unsafe {
            libc::posix_fadvise(
                self.fd.as_raw_fd(),
                self.offset as i64,
                libc::off_t::from(self.len),
                self.advice,
            )
        };
        // posix_fadvise returns the error instead of setting errno.
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(0)
    }

    fn complete(self, res: io::Result<usize>) -> io::Result<()> {
        res.map(drop)
    }
}
