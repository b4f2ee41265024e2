//! Files as their operations hold them ([`FileFd`]: the descriptor, the lane of its buffered
//! writes, whether `RWF_NOWAIT` is worth trying), and the plain reads and writes.
//!
//! Each operation keeps the file open with an `Arc<FileFd>` and owns its buffers until it
//! completes. Reads and writes also have a non-blocking form ([`Op::call_nowait`],
//! `RWF_NOWAIT`), which both backends try on the loop thread first: what the page cache holds
//! is copied at once, and only the rest goes to the ring or the thread pool. The other file
//! operations: `file_buffers.rs` (several buffers, registered buffers) and `file_meta.rs`
//! (open, sync, space, advice).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use io_uring::squeue::Entry;
use io_uring::{opcode, types};

use super::inline_writes::{self, InlineWrites};
use super::{Op, len32};
use crate::io::{IoBuf, IoBufMut};
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
    pub(super) fn writes_punted_by_the_ring(&self) -> bool {
        // Relaxed: a hint (see `NoWait`).
        self.buffered && !self.write.enabled.load(Ordering::Relaxed)
    }

    /// The lane of a write to this file on the thread pool: its buffered writes hold the
    /// inode's lock throughout, so they run one after another on one pool thread instead of
    /// queueing on that lock on many. `O_DIRECT` writes run side by side.
    pub(super) fn write_lane(&self) -> Option<&Lane> {
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
    pub(super) fn write_inline_now(&self, offset: u64, len: usize) -> bool {
        self.writes_punted_by_the_ring()
            && !self.sync
            && inline_writes::whole_pages(offset, len)
            && self.inline.may_run(len)
            && self.writes.idle()
    }

    /// A write's blocking `call` of `len` bytes, timed by the guard when it is a buffered
    /// write the file system cannot make without blocking (wherever it runs: a stall seen on
    /// the pool keeps the loop's writes off too).
    pub(super) fn blocking_write(
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

impl FileFd {
    /// The non-blocking form of a read (`write` false) or write of `iov` at `offset`
    /// (`preadv2`/`pwritev2` with `RWF_NOWAIT`), if it is worth trying on this file: `None`
    /// sends the operation on to its blocking path (see `nowait`).
    pub(crate) fn try_nowait(
        &self,
        iov: &[libc::iovec],
        offset: u64,
        write: bool,
    ) -> Option<io::Result<usize>> {
        let nw = if write { &self.write } else { &self.read };
        let want = iov.iter().map(|v| v.iov_len).sum();
        nowait(nw, want, || {
            rw_nowait(self.fd.as_raw_fd(), iov, offset, write)
        })
    }

    /// Whether the non-blocking form of writes is still tried on this file.
    pub(crate) fn nowait_writes(&self) -> bool {
        self.write.enabled()
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
