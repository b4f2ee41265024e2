//! The file operations: one type each, with its io_uring SQE and its blocking call.
//!
//! Each keeps the file open with an `Arc<FileFd>` and owns its buffers until it completes.
//! Reads and writes also have a non-blocking form ([`Op::call_nowait`], `RWF_NOWAIT`), which
//! both backends try on the loop thread first: what the page cache holds is copied at once,
//! and only the rest goes to the ring or the thread pool.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use io_uring::squeue::Entry;
use io_uring::{opcode, types};

use super::inline_writes::{self, InlineWrites};
use super::{Op, len32};
use crate::io::{IoBuf, IoBufMut};
use crate::rt::fixed::FixedBuf;
use crate::sched::lane::Lane;
use crate::sys::cvt;

/// An open file as its operations hold it: the descriptor, and for reads and writes whether
/// `RWF_NOWAIT` is worth trying on it.
///
/// Not on an `O_DIRECT` file (the flags are read once, when the file is wrapped): a direct
/// read with `RWF_NOWAIT` still waits for the device. No writes on an `O_APPEND` file. A kind of call the file does not support
/// with `RWF_NOWAIT` (`EOPNOTSUPP`: buffered writes on ext4 and tmpfs, devices without it) is
/// not tried again on the file.
pub(crate) struct FileFd {
    fd: OwnedFd,
    /// Not `O_DIRECT`.
    buffered: bool,
    read: NoWait,
    write: NoWait,
    /// Where its buffered writes run when they go to the thread pool: in order, one at a
    /// time (see `sched/lane.rs`).
    writes: Lane,
    /// Whether its buffered writes may run on the loop thread (see `inline_writes.rs`).
    inline: InlineWrites,
    /// Opened `O_SYNC` or `O_DSYNC`: every write waits for the device, so none runs inline.
    sync: bool,
}

impl FileFd {
    pub(crate) fn new(fd: OwnedFd) -> FileFd {
        // SAFETY: F_GETFL on an fd we own reads its status flags and touches no memory.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        let buffered = flags >= 0 && flags & libc::O_DIRECT == 0;
        // An append-mode write ignores its offset: a partial non-blocking write could not be
        // redone whole without appending its first part twice.
        let append = flags >= 0 && flags & libc::O_APPEND != 0;
        // O_SYNC includes the O_DSYNC bit.
        let sync = flags >= 0 && flags & libc::O_DSYNC != 0;
        FileFd {
            fd,
            buffered,
            read: NoWait::new(buffered),
            write: NoWait::new(buffered && !append),
            writes: Lane::new(),
            inline: InlineWrites::new(),
            sync,
        }
    }
}

impl FileFd {
    /// Whether io_uring would hand a write to this file to one of its io-wq workers every
    /// time: a buffered write on a file system that cannot do one without blocking (it
    /// refused `RWF_NOWAIT` with `EOPNOTSUPP`: ext4, tmpfs). io-wq also runs the buffered
    /// writes of one file one at a time, on one worker.
    fn writes_punted_by_the_ring(&self) -> bool {
        // Relaxed: a hint (see `NoWait`).
        self.buffered && !self.write.enabled.load(Ordering::Relaxed)
    }

    /// The lane of a write to this file on the thread pool: its buffered writes hold the
    /// inode's lock throughout, so they run one after another on one pool thread instead of
    /// queueing on that lock on many. `O_DIRECT` writes run side by side.
    fn write_lane(&self) -> Option<&Lane> {
        self.buffered.then_some(&self.writes)
    }

    /// The guard of this file's inline writes.
    pub(crate) fn inline_writes(&self) -> &InlineWrites {
        &self.inline
    }

    /// Whether a write of `len` bytes at `offset` runs on the loop thread now (see
    /// `inline_writes.rs`): a buffered write of whole pages that the file system cannot make
    /// without blocking, to a file not opened for synchronous writes, which the guard lets
    /// through, while no earlier write of the file is still on the pool.
    fn write_inline_now(&self, offset: u64, len: usize) -> bool {
        self.writes_punted_by_the_ring()
            && !self.sync
            && inline_writes::whole_pages(offset, len)
            && self.inline.may_run(len)
            && self.writes.idle()
    }

    /// A write's blocking `call` of `len` bytes, timed by the guard when it is a buffered
    /// write the file system cannot make without blocking (wherever it runs: a stall seen on
    /// the pool keeps the loop's writes off too).
    fn blocking_write(
        &self,
        len: usize,
        call: impl FnOnce() -> io::Result<usize>,
    ) -> io::Result<usize> {
        if self.writes_punted_by_the_ring() {
            self.inline.timed(len, call)
        } else {
            call()
        }
    }
}

impl AsRawFd for FileFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for FileFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Whether to try one kind of call with `RWF_NOWAIT`, and a backoff for files the page cache
/// does not hold: after a miss the next 1, then 3, 7, ... up to 64 calls go straight to the
/// blocking path, and a hit starts over. A file that is never cached thus pays the failed
/// attempt (`EAGAIN`, well under a microsecond) on at most one call in 65.
///
/// Every field is a hint: no other memory is published through them, so each access is
/// `Relaxed`, and racing updates from threads sharing the file only shift the counts.
struct NoWait {
    enabled: AtomicBool,
    /// Calls left to send to the blocking path before the next attempt.
    skip: AtomicU32,
    /// How many calls the next miss skips.
    next_skip: AtomicU32,
}

const MAX_SKIP: u32 = 64;

impl NoWait {
    fn new(enabled: bool) -> NoWait {
        NoWait {
            enabled: AtomicBool::new(enabled),
            skip: AtomicU32::new(0),
            next_skip: AtomicU32::new(1),
        }
    }

    fn enabled(&self) -> bool {
        // Relaxed: a hint (see the type's doc); pairs with nothing.
        self.enabled.load(Ordering::Relaxed)
    }

    fn should_try(&self) -> bool {
        // Relaxed: a hint (see the type's doc); pairs with nothing.
        if !self.enabled.load(Ordering::Relaxed) {
            return false;
        }
        // Relaxed: as above.
        let skip = self.skip.load(Ordering::Relaxed);
        if skip > 0 {
            // Relaxed: as above.
            self.skip.store(skip - 1, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn hit(&self) {
        // Relaxed: as above.
        self.next_skip.store(1, Ordering::Relaxed);
    }

    fn miss(&self) {
        // Relaxed: as above.
        let n = self.next_skip.load(Ordering::Relaxed);
        // Relaxed: as above.
        self.skip.store(n, Ordering::Relaxed);
        // Relaxed: as above.
        self.next_skip
            .store((n * 2 + 1).min(MAX_SKIP), Ordering::Relaxed);
    }

    fn unsupported(&self) {
        // Relaxed: as above.
        self.enabled.store(false, Ordering::Relaxed);
    }
}

/// `call` (`preadv2`/`pwritev2` with `RWF_NOWAIT` for `want` bytes), made if `nw` says it is
/// worth trying: the result when the page cache served all of it (or the call failed for a
/// reason the blocking call would share), `None` when the blocking call must do it.
///
/// A partial transfer is `None` too: the blocking call then does the whole range again (the
/// same bytes at the same offset), so callers never see a short read that is not at the end
/// of the file.
fn nowait(
    nw: &NoWait,
    want: usize,
    call: impl FnOnce() -> io::Result<usize>,
) -> Option<io::Result<usize>> {
    if !nw.should_try() {
        return None;
    }
    match call() {
        Ok(n) if n == want || n == 0 => {
            nw.hit();
            Some(Ok(n))
        }
        Ok(_) => {
            nw.miss();
            None
        }
        Err(e) => match e.raw_os_error() {
            // EINVAL: a file whose driver rejects the flag here; the blocking call gives the
            // definitive answer, and the backoff keeps the cost of asking bounded.
            Some(libc::EAGAIN) | Some(libc::EINVAL) => {
                nw.miss();
                None
            }
            // The file (or the kernel: `ENOSYS` before 4.6, a seccomp filter's `EPERM`) has no
            // non-blocking form of the call: the blocking path does it, now and from now on.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EPERM) => {
                nw.unsupported();
                None
            }
            _ => Some(Err(e)),
        },
    }
}

/// `preadv2`/`pwritev2` of `iov` at `offset` with `RWF_NOWAIT`.
fn rw_nowait(fd: RawFd, iov: &[libc::iovec], offset: u64, write: bool) -> io::Result<usize> {
    let cnt = iov.len() as i32;
    // SAFETY: the iovecs cover memory the operation owns (rooms to fill for a read,
    // initialised bytes for a write); the offset was checked to fit an off_t.
    let rc = unsafe {
        if write {
            libc::pwritev2(fd, iov.as_ptr(), cnt, offset as i64, libc::RWF_NOWAIT)
        } else {
            libc::preadv2(fd, iov.as_ptr(), cnt, offset as i64, libc::RWF_NOWAIT)
        }
    };
    cvt(rc).map(|n| n as usize)
}

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
        let len = self.buf.bytes_total();
        let iov = [libc::iovec {
            iov_base: self.buf.stable_mut_ptr().cast(),
            iov_len: len,
        }];
        let fd = self.fd.as_raw_fd();
        nowait(&self.fd.read, len, || {
            rw_nowait(fd, &iov, self.offset, false)
        })
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
        let len = self.buf.bytes_init();
        let iov = [libc::iovec {
            iov_base: self.buf.stable_ptr().cast_mut().cast(),
            iov_len: len,
        }];
        let fd = self.fd.as_raw_fd();
        nowait(&self.fd.write, len, || {
            rw_nowait(fd, &iov, self.offset, true)
        })
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

/// `preadv`: into the rooms of `bufs`, in order.
pub(crate) struct ReadvAt<B> {
    pub(crate) fd: Arc<FileFd>,
    pub(crate) bufs: Vec<B>,
    pub(crate) offset: u64,
    /// Built from `bufs` when the operation starts; its heap block is what the kernel reads.
    pub(crate) iov: Vec<libc::iovec>,
}

impl<B: IoBufMut> ReadvAt<B> {
    fn fill_iov(&mut self) {
        self.iov = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.stable_mut_ptr().cast(),
                iov_len: b.bytes_total(),
            })
            .collect();
    }
}

// SAFETY: the iovecs only point into the buffers this operation owns, which move with it.
unsafe impl<B: Send> Send for ReadvAt<B> {}

// SAFETY: the iovecs (owned, in a Vec's heap block) cover the buffers' rooms, which the
// operation owns; the Arc keeps the fd open. The caller checked the count against IOV_MAX.
unsafe impl<B: IoBufMut> Op for ReadvAt<B> {
    type Output = (io::Result<usize>, Vec<B>);

    fn sqe(&mut self) -> Entry {
        self.fill_iov();
        opcode::Readv::new(
            types::Fd(self.fd.as_raw_fd()),
            self.iov.as_ptr(),
            self.iov.len() as u32,
        )
        .offset(self.offset)
        .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        self.fill_iov();
        // SAFETY: as above.
        cvt(unsafe {
            libc::preadv(
                self.fd.as_raw_fd(),
                self.iov.as_ptr(),
                self.iov.len() as i32,
                self.offset as i64,
            )
        })
        .map(|n| n as usize)
    }

    fn call_nowait(&mut self) -> Option<io::Result<usize>> {
        self.fill_iov();
        let want = self.iov.iter().map(|v| v.iov_len).sum();
        let (fd, iov, offset) = (self.fd.as_raw_fd(), &self.iov, self.offset);
        nowait(&self.fd.read, want, || rw_nowait(fd, iov, offset, false))
    }

    fn complete(mut self, res: io::Result<usize>) -> Self::Output {
        if let Ok(mut n) = res {
            for b in &mut self.bufs {
                let k = n.min(b.bytes_total());
                // SAFETY: the kernel filled the buffers in order, `k` bytes of this one.
                unsafe { b.set_init(k) };
                n -= k;
            }
        }
        (res, self.bufs)
    }
}

/// `pwritev`: the initialised bytes of `bufs`, in order.
pub(crate) struct WritevAt<B> {
    pub(crate) fd: Arc<FileFd>,
    pub(crate) bufs: Vec<B>,
    pub(crate) offset: u64,
    /// Built from `bufs` when the operation starts.
    pub(crate) iov: Vec<libc::iovec>,
}

impl<B: IoBuf> WritevAt<B> {
    fn fill_iov(&mut self) {
        self.iov = self
            .bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.stable_ptr().cast_mut().cast(),
                iov_len: b.bytes_init(),
            })
            .collect();
    }
}

// SAFETY: as for `ReadvAt`.
unsafe impl<B: Send> Send for WritevAt<B> {}

// SAFETY: as for `ReadvAt`, for the buffers' initialised bytes (only read).
unsafe impl<B: IoBuf> Op for WritevAt<B> {
    type Output = (io::Result<usize>, Vec<B>);

    fn sqe(&mut self) -> Entry {
        self.fill_iov();
        opcode::Writev::new(
            types::Fd(self.fd.as_raw_fd()),
            self.iov.as_ptr(),
            self.iov.len() as u32,
        )
        .offset(self.offset)
        .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        self.fill_iov();
        let len = self.iov.iter().map(|v| v.iov_len).sum();
        let (fd, iov, offset) = (self.fd.as_raw_fd(), &self.iov, self.offset as i64);
        self.fd.blocking_write(len, || {
            // SAFETY: as above.
            cvt(unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, offset) })
                .map(|n| n as usize)
        })
    }

    fn call_inline(&mut self) -> Option<io::Result<usize>> {
        let len = self.bufs.iter().map(|b| b.bytes_init()).sum();
        self.fd
            .write_inline_now(self.offset, len)
            .then(|| self.call())
    }

    fn call_nowait(&mut self) -> Option<io::Result<usize>> {
        if !self.fd.write.enabled() {
            // Not worth building the iovecs (`call` builds them).
            return None;
        }
        self.fill_iov();
        let want = self.iov.iter().map(|v| v.iov_len).sum();
        let (fd, iov, offset) = (self.fd.as_raw_fd(), &self.iov, self.offset);
        nowait(&self.fd.write, want, || rw_nowait(fd, iov, offset, true))
    }

    fn prefers_pool(&self) -> bool {
        self.fd.writes_punted_by_the_ring()
    }

    fn pool_lane(&self) -> Option<&Lane> {
        self.fd.write_lane()
    }

    fn complete(self, res: io::Result<usize>) -> Self::Output {
        (res, self.bufs)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_back_off_up_to_one_try_in_65_and_a_hit_starts_over() {
        let nw = NoWait::new(true);
        let tries = |n: usize| (0..n).filter(|_| nw.should_try()).count();
        assert_eq!(tries(10), 10, "no miss yet: every call tries");
        // A file that is never cached: every try misses, and the calls skipped between tries
        // grow 1, 3, 7, ... up to 64.
        let mut skipped = Vec::new();
        let mut k = 0;
        for _ in 0..2000 {
            if nw.should_try() {
                nw.miss();
                skipped.push(k);
                k = 0;
            } else {
                k += 1;
            }
        }
        assert_eq!(skipped[..9], [0, 1, 3, 7, 15, 31, 63, 64, 64]);
        assert!(skipped[7..].iter().all(|&k| k == 64));
        nw.hit();
        nw.miss();
        assert!(
            !nw.should_try(),
            "a hit resets the backoff to its first step"
        );
        assert!(nw.should_try());
        nw.unsupported();
        assert_eq!(tries(100), 0, "never again once unsupported");
    }

    #[test]
    fn what_goes_to_the_blocking_path_and_what_comes_back() {
        let err = |e| move || Err(io::Error::from_raw_os_error(e));
        // No non-blocking form here: the blocking path, now and from now on.
        for e in [libc::EOPNOTSUPP, libc::ENOSYS, libc::EPERM] {
            let nw = NoWait::new(true);
            assert!(nowait(&nw, 10, err(e)).is_none(), "errno {e}");
            assert!(
                !nw.should_try() && !nw.should_try(),
                "errno {e}: off for good"
            );
        }
        // Would block, or a partial transfer: the blocking path, and a backoff.
        for res in [Err(libc::EAGAIN), Ok(4)] {
            let nw = NoWait::new(true);
            let got = match res {
                Ok(n) => nowait(&nw, 10, || Ok(n)),
                Err(e) => nowait(&nw, 10, err(e)),
            };
            assert!(got.is_none());
            assert!(!nw.should_try(), "one call skipped");
            assert_eq!(
                nowait(&nw, 10, || Ok(10)).unwrap().unwrap(),
                10,
                "then tried again"
            );
        }
        // An error the blocking call would give too is the result; so is the end of the file.
        let nw = NoWait::new(true);
        let e = nowait(&nw, 10, err(libc::EBADF)).unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        assert_eq!(nowait(&nw, 10, || Ok(0)).unwrap().unwrap(), 0);
    }
}
