//! What each FUSE request does to the export, whichever transport brought it: the image as one
//! regular file (the mount's root), read and written through `reactor::fs` like the NBD side
//! (io_uring operations on the uring backend, the thread pool on epoll), so that a write
//! through either is read through the other.
//!
//! Every open is `FOPEN_DIRECT_IO`: the kernel keeps no page cache of the mounted file, so
//! what NBD clients write is what the mount reads, and `O_DIRECT` users of the mount get what
//! they asked for. The image's own page cache (or `O_DIRECT`, with `--cache none`) is the
//! export's, shared with NBD.

use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::abi::{self, Pod, op};
use crate::Export;
use crate::direct::AlignedPool;

/// How long the kernel may cache the file's attributes (its size never changes; its times
/// may lag by this much).
const ATTR_VALID_SECS: u64 = 1;

/// The export's FUSE side, shared by every queue and thread serving it.
#[derive(Debug)]
pub(crate) struct Fs {
    pub(crate) export: Arc<Export>,
    /// Mode bits (with `S_IFREG`), changed by `chmod` on the mount; not stored in the image.
    mode: AtomicU32,
    /// Owner, changed by `chown` on the mount: `uid << 32 | gid`.
    owner: AtomicU64,
    /// Requests the kernel asked to interrupt, not yet finished.
    pub(crate) interrupts: Interrupts,
    /// Counters.
    pub(crate) stats: FuseCounters,
}

/// Counters of one FUSE export.
#[derive(Debug, Default)]
pub(crate) struct FuseCounters {
    pub(crate) requests: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) interrupted: AtomicU64,
    pub(crate) ring_requests: AtomicU64,
}

/// What a request's work came to: an errno (0 for success) and the reply's bytes, which are
/// the first `len` bytes of the request's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) error: i32,
    pub(crate) len: usize,
}

impl Reply {
    fn err(errno: i32) -> Reply {
        Reply {
            error: errno,
            len: 0,
        }
    }
}

/// Whether a request gets a reply at all (FORGET and its batch do not).
pub(crate) fn has_reply(opcode: u32) -> bool {
    !matches!(opcode, op::FORGET | op::BATCH_FORGET)
}

impl Fs {
    /// The FUSE side of `export`, owned by `uid:gid` with `mode` (0644, or 0444 for a
    /// read-only export, unless given).
    pub(crate) fn new(export: Arc<Export>) -> io::Result<Fs> {
        let st = fstat(export.file().as_raw_fd())?;
        let perm = if export.read_only() { 0o444 } else { 0o644 };
        Ok(Fs {
            mode: AtomicU32::new(libc::S_IFREG | perm),
            owner: AtomicU64::new(u64::from(st.st_uid) << 32 | u64::from(st.st_gid)),
            export,
            interrupts: Interrupts::default(),
            stats: FuseCounters::default(),
        })
    }

    /// Serves one request (other than INIT, INTERRUPT and the FORGETs, which the transport
    /// handles): `arg` is its opcode's first argument, `buf` the request's buffer, holding a
    /// WRITE's data at `data`. The reply's bytes are left at the start of `buf`.
    pub(crate) async fn serve(
        &self,
        h: &abi::InHeader,
        arg: &[u8],
        mut buf: Vec<u8>,
        data: Range<usize>,
        pool: &AlignedPool,
    ) -> (Reply, Vec<u8>) {
        // Relaxed: statistics.
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if self.interrupts.take(h.unique) {
            self.stats.interrupted.fetch_add(1, Ordering::Relaxed);
            return (Reply::err(libc::EINTR), buf);
        }
        let reply = match h.opcode {
            op::GETATTR => self.attr_reply(&mut buf),
            op::SETATTR => match abi::SetattrIn::read(arg) {
                Some(a) => match self.setattr(&a) {
                    Ok(()) => self.attr_reply(&mut buf),
                    Err(e) => Reply::err(e),
                },
                None => Reply::err(libc::EINVAL),
            },
            op::OPEN => match abi::OpenIn::read(arg) {
                Some(a) => self.open(&a, &mut buf),
                None => Reply::err(libc::EINVAL),
            },
            op::RELEASE => Reply::err(0),
            op::READ => match abi::ReadIn::read(arg) {
                Some(a) => {
                    let (r, b) = self.read(&a, buf, pool).await;
                    buf = b;
                    r
                }
                None => Reply::err(libc::EINVAL),
            },
            op::WRITE => match abi::WriteIn::read(arg) {
                Some(a) => {
                    let (r, b) = self.write(&a, buf, data, pool).await;
                    buf = b;
                    r
                }
                None => Reply::err(libc::EINVAL),
            },
            op::FLUSH | op::FSYNC | op::SYNCFS => self.sync().await,
            op::FALLOCATE => match abi::FallocateIn::read(arg) {
                Some(a) => self.fallocate(&a).await,
                None => Reply::err(libc::EINVAL),
            },
            op::LSEEK => match abi::LseekIn::read(arg) {
                Some(a) => self.lseek(&a, &mut buf),
                None => Reply::err(libc::EINVAL),
            },
            op::STATFS => self.statfs(&mut buf),
            op::DESTROY => Reply::err(0),
            // The root is a file: nothing to look up or list.
            op::LOOKUP | op::OPENDIR => Reply::err(libc::ENOTDIR),
            // `default_permissions`: the kernel checks access itself; STATX falls back to
            // GETATTR; everything else is not a file's business.
            _ => Reply::err(libc::ENOSYS),
        };
        self.interrupts.done(h.unique);
        if reply.error != 0 && reply.error != libc::ENOSYS {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        (reply, buf)
    }

    /// The file's attributes: the export's size and the image's times and allocation.
    fn attr(&self) -> abi::Attr {
        let st = fstat(self.export.file().as_raw_fd()).unwrap_or_else(|_| zeroed_stat());
        // Relaxed: a value of its own, published by nothing else.
        let owner = self.owner.load(Ordering::Relaxed);
        abi::Attr {
            ino: abi::ROOT_ID,
            size: self.export.size(),
            blocks: st.st_blocks as u64,
            atime: st.st_atime as u64,
            mtime: st.st_mtime as u64,
            ctime: st.st_ctime as u64,
            atimensec: st.st_atime_nsec as u32,
            mtimensec: st.st_mtime_nsec as u32,
            ctimensec: st.st_ctime_nsec as u32,
            mode: self.mode.load(Ordering::Relaxed),
            nlink: 1,
            uid: (owner >> 32) as u32,
            gid: owner as u32,
            rdev: 0,
            blksize: self.export.min_block().max(4096),
            flags: 0,
        }
    }

    fn attr_reply(&self, buf: &mut Vec<u8>) -> Reply {
        let out = abi::AttrOut {
            attr_valid: ATTR_VALID_SECS,
            attr: self.attr(),
            ..Default::default()
        };
        put(buf, &out)
    }

    /// SETATTR: mode and owner are kept in memory; times go to the image; the size cannot
    /// change (`EPERM`), except to itself (an `O_TRUNC` open of an empty export, a `truncate`
    /// to the same size).
    fn setattr(&self, a: &abi::SetattrIn) -> Result<(), i32> {
        use abi::fattr;
        if a.valid & fattr::SIZE != 0 && a.size != self.export.size() {
            return Err(libc::EPERM);
        }
        if a.valid
            & (fattr::SIZE | fattr::ATIME | fattr::MTIME | fattr::ATIME_NOW | fattr::MTIME_NOW)
            != 0
            && self.export.read_only()
        {
            return Err(libc::EROFS);
        }
        // Relaxed: mode and owner are values of their own, read by `attr` and published by
        // nothing else (two racing SETATTRs may interleave, as on any file).
        if a.valid & fattr::MODE != 0 {
            self.mode
                .store(libc::S_IFREG | (a.mode & 0o7777), Ordering::Relaxed);
        }
        if a.valid & (fattr::UID | fattr::GID) != 0 {
            let old = self.owner.load(Ordering::Relaxed);
            let uid = if a.valid & fattr::UID != 0 {
                a.uid
            } else {
                (old >> 32) as u32
            };
            let gid = if a.valid & fattr::GID != 0 {
                a.gid
            } else {
                old as u32
            };
            self.owner
                .store(u64::from(uid) << 32 | u64::from(gid), Ordering::Relaxed);
        }
        let time = |set: u32, now: u32, sec: u64, nsec: u32| -> libc::timespec {
            if a.valid & now != 0 {
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                }
            } else if a.valid & set != 0 {
                libc::timespec {
                    tv_sec: sec as libc::time_t,
                    tv_nsec: i64::from(nsec),
                }
            } else {
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                }
            }
        };
        let times = [
            time(fattr::ATIME, fattr::ATIME_NOW, a.atime, a.atimensec),
            time(fattr::MTIME, fattr::MTIME_NOW, a.mtime, a.mtimensec),
        ];
        if times.iter().any(|t| t.tv_nsec != libc::UTIME_OMIT) {
            // SAFETY: two timespecs, as futimens reads.
            let rc = unsafe { libc::futimens(self.export.file().as_raw_fd(), times.as_ptr()) };
            if rc != 0 {
                return Err(last_errno());
            }
        }
        Ok(())
    }

    /// OPEN: no page cache on the mount's side (see the module docs); writes refused on a
    /// read-only export (the read-only mount refuses them first).
    fn open(&self, a: &abi::OpenIn, buf: &mut Vec<u8>) -> Reply {
        if self.export.read_only() && a.flags as i32 & libc::O_ACCMODE != libc::O_RDONLY {
            return Reply::err(libc::EROFS);
        }
        let out = abi::OpenOut {
            fh: 0,
            open_flags: abi::fopen::DIRECT_IO | abi::fopen::PARALLEL_DIRECT_WRITES,
            backing_id: 0,
        };
        put(buf, &out)
    }

    /// READ: up to the end of the export (a read past it returns nothing).
    async fn read(
        &self,
        a: &abi::ReadIn,
        mut buf: Vec<u8>,
        pool: &AlignedPool,
    ) -> (Reply, Vec<u8>) {
        let size = self.export.size();
        let n = u64::from(a.size).min(size.saturating_sub(a.offset)) as usize;
        buf.clear();
        if n == 0 {
            return (Reply::err(0), buf);
        }
        if n > buf.capacity() {
            return (Reply::err(libc::EINVAL), buf);
        }
        let file = self.export.file();
        if let Some(d) = self.export.direct() {
            let res = crate::direct::read(d, file, pool, &mut buf, a.offset, n).await;
            return match res {
                Ok(()) => (
                    Reply {
                        error: 0,
                        len: buf.len(),
                    },
                    buf,
                ),
                Err(e) => (Reply::err(errno(&e)), buf),
            };
        }
        let mut done = 0;
        while done < n {
            let (res, b) = file
                .read_at(
                    reactor::io::Slice::range(buf, done, n),
                    a.offset + done as u64,
                )
                .await;
            buf = b.into_inner();
            match res {
                Ok(0) => {
                    // The image is shorter than the export (truncated behind our back): zeros.
                    buf.resize(n, 0);
                    break;
                }
                Ok(k) => done += k,
                Err(e) => return (Reply::err(errno(&e)), buf),
            }
        }
        (Reply { error: 0, len: n }, buf)
    }

    /// WRITE: all of it within the export, or `ENOSPC` past its end (the size is fixed).
    async fn write(
        &self,
        a: &abi::WriteIn,
        buf: Vec<u8>,
        data: Range<usize>,
        pool: &AlignedPool,
    ) -> (Reply, Vec<u8>) {
        if self.export.read_only() {
            return (Reply::err(libc::EROFS), buf);
        }
        let len = (a.size as usize).min(data.len());
        if a.offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.export.size())
        {
            return (Reply::err(libc::ENOSPC), buf);
        }
        let file = self.export.file();
        let (res, mut buf) = match self.export.direct() {
            Some(d) => {
                let _span = d.lock(a.offset, len as u64).await;
                let bytes = &buf[data.start..data.start + len];
                let res = crate::direct::write(d, file, pool, bytes, a.offset).await;
                (res, buf)
            }
            None => {
                let mut buf = buf;
                let mut done = 0;
                let mut res = Ok(());
                while done < len {
                    let from = data.start + done;
                    let (r, b) = file
                        .write_at(
                            reactor::io::Slice::range(buf, from, data.start + len),
                            a.offset + done as u64,
                        )
                        .await;
                    buf = b.into_inner();
                    match r {
                        Ok(0) => {
                            res = Err(io::ErrorKind::WriteZero.into());
                            break;
                        }
                        Ok(k) => done += k,
                        Err(e) => {
                            res = Err(e);
                            break;
                        }
                    }
                }
                (res, buf)
            }
        };
        match res {
            Ok(()) => {
                let out = abi::WriteOut {
                    size: len as u32,
                    padding: 0,
                };
                (put(&mut buf, &out), buf)
            }
            Err(e) => (Reply::err(errno(&e)), buf),
        }
    }

    /// FLUSH, FSYNC, SYNCFS: `fdatasync` of the image, so that every write acknowledged before
    /// is durable when this returns (the file's size never changes: its data is all there is).
    async fn sync(&self) -> Reply {
        // Relaxed: a statistics counter.
        self.export.stats.syncs.fetch_add(1, Ordering::Relaxed);
        match self.export.file().fdatasync().await {
            Ok(()) => Reply::err(0),
            Err(e) => Reply::err(errno(&e)),
        }
    }

    /// FALLOCATE: punch a hole or zero a range (the size kept), or allocate within the
    /// export; anything that would change the size is refused (`EPERM`, as for SETATTR).
    async fn fallocate(&self, a: &abi::FallocateIn) -> Reply {
        if self.export.read_only() {
            return Reply::err(libc::EROFS);
        }
        let mode = a.mode as i32;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Reply::err(libc::EOPNOTSUPP);
        }
        let size = self.export.size();
        let Some(end) = a.offset.checked_add(a.length) else {
            return Reply::err(libc::EINVAL);
        };
        if end > size && mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            return Reply::err(libc::EPERM);
        }
        let len = end.min(size).saturating_sub(a.offset);
        if len == 0 {
            return Reply::err(0);
        }
        let span = match self.export.direct() {
            Some(d) => Some(d.lock(a.offset, len).await),
            None => None,
        };
        let res = self
            .export
            .file()
            .fallocate(mode | libc::FALLOC_FL_KEEP_SIZE, a.offset, len)
            .await;
        self.export.data_region.forget();
        drop(span);
        match res {
            Ok(()) => Reply::err(0),
            Err(e) => Reply::err(errno(&e)),
        }
    }

    /// LSEEK with `SEEK_DATA`/`SEEK_HOLE` (the kernel answers the others itself): the image's
    /// own holes, within the export (the end of the export is a hole).
    fn lseek(&self, a: &abi::LseekIn, buf: &mut Vec<u8>) -> Reply {
        let whence = a.whence as i32;
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Reply::err(libc::EINVAL);
        }
        let size = self.export.size();
        if a.offset >= size {
            return Reply::err(libc::ENXIO);
        }
        // SAFETY: lseek on an fd the export keeps open; the position it moves is not used
        // (every read and write gives its offset).
        let at = unsafe { libc::lseek(self.export.file().as_raw_fd(), a.offset as i64, whence) };
        let at = if at < 0 {
            match last_errno() {
                // Data sought past the image's last data: none before the end.
                libc::ENXIO if whence == libc::SEEK_DATA => return Reply::err(libc::ENXIO),
                libc::ENXIO => size,
                e => return Reply::err(e),
            }
        } else {
            (at as u64).min(size)
        };
        put(buf, &abi::LseekOut { offset: at })
    }

    /// STATFS: the file system that holds the image.
    fn statfs(&self, buf: &mut Vec<u8>) -> Reply {
        // SAFETY: fstatvfs writes one statvfs into the zeroed value.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the fd is the export's, open.
        if unsafe { libc::fstatvfs(self.export.file().as_raw_fd(), &mut s) } != 0 {
            return Reply::err(last_errno());
        }
        let out = abi::StatfsOut {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: 255,
            frsize: s.f_frsize as u32,
            ..Default::default()
        };
        put(buf, &out)
    }
}

/// Requests the kernel asked to interrupt (FUSE_INTERRUPT), until they finish: a request not
/// yet started when its interrupt arrives is answered `EINTR` without doing its work. Bounded:
/// an interrupt for a request that already finished (or never existed) is forgotten once
/// [`MAX_INTERRUPTS`] newer ones have arrived.
#[derive(Debug, Default)]
pub(crate) struct Interrupts {
    /// How many are recorded: the common case (none) costs one load per request.
    count: AtomicU32,
    uniques: Mutex<std::collections::VecDeque<u64>>,
}

/// Interrupts remembered at most.
pub(crate) const MAX_INTERRUPTS: usize = 256;

impl Interrupts {
    /// Records an interrupt for request `unique`.
    pub(crate) fn mark(&self, unique: u64) {
        let mut q = self.uniques.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == MAX_INTERRUPTS {
            q.pop_front();
        }
        q.push_back(unique);
        // Relaxed: a hint read before taking the lock, which orders the queue itself.
        self.count.store(q.len() as u32, Ordering::Relaxed);
    }

    /// Whether `unique` was interrupted (and forgets it).
    pub(crate) fn take(&self, unique: u64) -> bool {
        // Relaxed: see `mark`; a request racing its own interrupt is served (the kernel then
        // takes the reply as it is).
        if self.count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut q = self.uniques.lock().unwrap_or_else(|e| e.into_inner());
        let hit = q
            .iter()
            .position(|&u| u == unique)
            .map(|i| q.remove(i))
            .is_some();
        self.count.store(q.len() as u32, Ordering::Relaxed);
        hit
    }

    /// `unique` finished: an interrupt that came for it meanwhile is forgotten.
    pub(crate) fn done(&self, unique: u64) {
        let _ = self.take(unique);
    }
}

/// Puts `v` at the start of `buf` as the reply.
fn put<T: Pod>(buf: &mut Vec<u8>, v: &T) -> Reply {
    buf.clear();
    buf.extend_from_slice(v.bytes());
    Reply {
        error: 0,
        len: buf.len(),
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn last_errno() -> i32 {
    errno(&io::Error::last_os_error())
}

fn zeroed_stat() -> libc::stat {
    // SAFETY: an all-zero stat is a valid value (integers only).
    unsafe { std::mem::zeroed() }
}

fn fstat(fd: i32) -> io::Result<libc::stat> {
    let mut st = zeroed_stat();
    // SAFETY: fstat writes one stat into `st`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}
