//! Files: open, positioned reads and writes with owned buffers, fsync and fdatasync.
//!
//! A read or write first tries what the page cache can do at once, on the loop thread
//! (`preadv2`/`pwritev2` with `RWF_NOWAIT`; never on `O_DIRECT` or append-mode writes, and never
//! returning a short transfer that the blocking call would not): on a cached file that is the
//! whole operation, one system call.
//!
//! Buffered writes to a file system that cannot make them without blocking (ext4, tmpfs) are
//! made on the loop thread too, while they are small, cover whole pages and are fast: a copy
//! into the page cache costs less than a hand-over to another thread. Every such write is
//! timed, and one that waited (dirty-page throttling, the journal) sends the file's writes to
//! the thread pool until they are fast again: see [`File::set_inline_writes`], which also
//! turns this off.
//!
//! Otherwise, and for every other operation, on the io_uring backend it is an io_uring
//! operation on the reactor's ring, except those buffered writes, which io_uring would give one
//! by one to its own worker thread and which go to the reactor's thread pool instead; on epoll
//! it runs on the reactor's thread pool. On the pool, a file's buffered writes run one at a
//! time in the order they were made, on one thread (a lane): the kernel holds the file's lock
//! through each of them anyway, so more threads would only queue on it (io_uring's workers do
//! the same); a write runs on the loop thread only when no earlier one is still there. Writes
//! in flight together that overlap still have no defined order, as with any asynchronous I/O:
//! one may have run at once and a later one not. The reactor thread does not read from or
//! write to a device itself; an inline write can still wait for what the system is doing, and
//! [`File::set_inline_writes`] says how long and how often.
//!
//! The buffer is owned by the operation while it is in flight: it comes back with the
//! result, `(io::Result<usize>, B)`. Dropping an operation's future cancels it (on the ring) or
//! lets the pool finish it; the buffer is freed only after the kernel is done with it, and a
//! file descriptor opened by a cancelled `open` is closed.
//!
//! `O_DIRECT` works with [`AlignedBuf`](crate::AlignedBuf) (and aligned offsets and lengths).
//!
//! ```
//! use reactor::{Reactor, fs::File};
//! let r = Reactor::new()?;
//! let path = std::env::temp_dir().join(format!("reactor-fs-doc-{}", std::process::id()));
//! let back = r.block_on(async {
//!     let f = File::create(&path).await?;
//!     let (res, _) = f.write_at(b"hello".to_vec(), 0).await;
//!     res?;
//!     f.fdatasync().await?;
//!     let (res, buf) = f.read_at(Vec::with_capacity(16), 0).await;
//!     res?;
//!     std::io::Result::Ok(buf)
//! })?;
//! assert_eq!(back, b"hello");
//! # std::fs::remove_file(&path)?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use crate::event_loop::Reactor;
use crate::io::{IoBuf, IoBufMut, write_all};
pub use crate::rt::fixed::{FixedBuf, FixedBufPool, MAX_FIXED_BUFFERS};
use crate::rt::op::file::{FileFd, ReadAt, WriteAt};
use crate::rt::op::file_buffers::{ReadAtFixed, ReadvAt, Vectored, WriteAtFixed, WritevAt};
use crate::rt::op::file_meta::{Fadvise, Fallocate, Fsync, Open};
use crate::rt::op::run;

/// How to open a file (like `std::fs::OpenOptions`, plus raw `open(2)` flags such as
/// `O_DIRECT`).
#[derive(Debug, Clone)]
pub struct OpenOptions {
    read: bool,
    write: bool,
    append: bool,
    truncate: bool,
    create: bool,
    create_new: bool,
    custom_flags: i32,
    mode: u32,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read: false,
            write: false,
            append: false,
            truncate: false,
            create: false,
            create_new: false,
            custom_flags: 0,
            mode: 0o666,
        }
    }
}

impl OpenOptions {
    /// Nothing set: set at least `read` or `write`.
    pub fn new() -> Self {
        Self::default()
    }
    /// Open for reading.
    pub fn read(&mut self, on: bool) -> &mut Self {
        self.read = on;
        self
    }
    /// Open for writing.
    pub fn write(&mut self, on: bool) -> &mut Self {
        self.write = on;
        self
    }
    /// Append (`O_APPEND`).
    pub fn append(&mut self, on: bool) -> &mut Self {
        self.append = on;
        self
    }
    /// Truncate to 0 bytes (`O_TRUNC`).
    pub fn truncate(&mut self, on: bool) -> &mut Self {
        self.truncate = on;
        self
    }
    /// Create if missing (`O_CREAT`).
    pub fn create(&mut self, on: bool) -> &mut Self {
        self.create = on;
        self
    }
    /// Create, failing if it exists (`O_CREAT | O_EXCL`).
    pub fn create_new(&mut self, on: bool) -> &mut Self {
        self.create_new = on;
        self
    }
    /// Extra `open(2)` flags, for example `libc::O_DIRECT`.
    pub fn custom_flags(&mut self, flags: i32) -> &mut Self {
        self.custom_flags = flags;
        self
    }
    /// Permission bits for a created file (default `0o666`, before the umask).
    pub fn mode(&mut self, mode: u32) -> &mut Self {
        self.mode = mode;
        self
    }

    fn flags(&self) -> io::Result<i32> {
        let access = match (self.read, self.write || self.append) {
            (true, false) => libc::O_RDONLY,
            (false, true) => libc::O_WRONLY,
            (true, true) => libc::O_RDWR,
            (false, false) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "OpenOptions: neither read nor write",
                ));
            }
        };
        let mut f = access | libc::O_CLOEXEC | self.custom_flags;
        if self.append {
            f |= libc::O_APPEND;
        }
        if self.truncate {
            f |= libc::O_TRUNC;
        }
        if self.create_new {
            f |= libc::O_CREAT | libc::O_EXCL;
        } else if self.create {
            f |= libc::O_CREAT;
        }
        Ok(f)
    }

    /// Opens `path` with these options.
    ///
    /// # Errors
    /// `open(2)`'s; `InvalidInput` for a path with a NUL byte or options without access.
    pub async fn open(&self, path: impl AsRef<Path>) -> io::Result<File> {
        let flags = self.flags()?;
        let path = CString::new(path.as_ref().as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
        let fd = run(Open {
            path,
            flags,
            mode: self.mode,
        })
        .await?;
        Ok(File {
            fd: Arc::new(FileFd::new(fd)),
        })
    }
}

/// An open file. Operations may run concurrently; each keeps the file open until it is done.
#[derive(Clone)]
pub struct File {
    fd: Arc<FileFd>,
}

impl fmt::Debug for File {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("File")
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

impl File {
    /// Opens `path` read-only.
    pub async fn open(path: impl AsRef<Path>) -> io::Result<File> {
        OpenOptions::new().read(true).open(path).await
    }

    /// Opens `path` read-write, creating or truncating it.
    pub async fn create(path: impl AsRef<Path>) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .await
    }

    /// Wraps an open `std::fs::File`.
    pub fn from_std(f: std::fs::File) -> File {
        File {
            fd: Arc::new(FileFd::new(OwnedFd::from(f))),
        }
    }

    /// Reads up to `buf.bytes_total()` bytes at `offset` into the start of `buf`; on success
    /// `buf` holds the `n` bytes read (a `Vec`'s length becomes `n`). 0 means end of file.
    /// An `offset` past `i64::MAX` is `InvalidInput` (on every `*_at` method), never a read
    /// at some other position.
    pub async fn read_at<B: IoBufMut + Send>(&self, buf: B, offset: u64) -> (io::Result<usize>, B) {
        if let Err(e) = check_offset(offset) {
            return (Err(e), buf);
        }
        let fd = self.fd.clone();
        run(ReadAt { fd, buf, offset }).await
    }

    /// Writes `buf`'s initialised bytes at `offset`; returns how many were written.
    pub async fn write_at<B: IoBuf + Send>(&self, buf: B, offset: u64) -> (io::Result<usize>, B) {
        if let Err(e) = check_offset(offset) {
            return (Err(e), buf);
        }
        let fd = self.fd.clone();
        run(WriteAt { fd, buf, offset }).await
    }

    /// Whether buffered writes that must be made by a blocking call may be made on the loop
    /// thread: writes the file system cannot make without blocking (ext4 and tmpfs refuse
    /// `RWF_NOWAIT` writes), and on any file system writes to a file opened `O_APPEND` (which
    /// never use `RWF_NOWAIT`). On by default; the setting is shared by every clone of this
    /// `File`.
    ///
    /// Such a write of whole pages normally waits for nothing: it copies into the page cache,
    /// a few microseconds for 4 KiB, which is less than handing it to a pool thread and back.
    /// So while this is on, a write is made on the loop thread when it covers whole pages
    /// (a write to part of a page the cache does not hold would read the page first), is at
    /// most 256 KiB, the file is not opened `O_SYNC`/`O_DSYNC`, and no earlier write of the
    /// file is still on the pool. Every such write, there or on the pool, is timed: one that
    /// took over 1 ms (plus 1 ns per byte) waited for something the system was doing
    /// (dirty-page throttling, the journal, reclaim, another thread's long write to the file,
    /// or the thread was preempted), and from then on the file's writes go to the pool until
    /// 64 in a row were fast again. Each loop thread writing to the file can therefore wait
    /// once per episode of slow writes; [`Stats::inline_write_stalls`](crate::Stats::inline_write_stalls)
    /// counts those waits. Shorter waits are not seen: on a device that needs stable pages
    /// (some RAID and checksumming setups), a write to a page under writeback waits for the
    /// device. A daemon that must never wait on the loop thread turns this off, and every such
    /// write goes to the pool. Writes that `RWF_NOWAIT` serves (XFS and btrfs, on files not
    /// opened `O_APPEND`) never block and run on the loop thread either way.
    ///
    /// ```
    /// use reactor::{Reactor, fs::File};
    /// let r = Reactor::new()?;
    /// let path = std::env::temp_dir().join(format!("reactor-inline-doc-{}", std::process::id()));
    /// r.block_on(async {
    ///     let f = File::create(&path).await?;
    ///     assert!(f.inline_writes());
    ///     f.set_inline_writes(false);
    ///     let (res, _) = f.write_at(vec![7u8; 4096], 0).await;
    ///     assert_eq!(res?, 4096);
    ///     std::io::Result::Ok(())
    /// })?;
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_inline_writes(&self, on: bool) {
        self.fd.inline_writes().set_allowed(on);
    }

    /// Whether buffered writes may be made on the loop thread (see
    /// [`set_inline_writes`](Self::set_inline_writes)).
    pub fn inline_writes(&self) -> bool {
        self.fd.inline_writes().allowed()
    }

    /// [`read_at`](Self::read_at) into a buffer of a [`FixedBufPool`]: when the read goes to
    /// the ring (not served by the page cache at once) and the pool is registered with the
    /// reactor running this task, a `READ_FIXED` that names the buffer by index (the kernel
    /// does not map its pages for the operation); otherwise, and on epoll, exactly `read_at`.
    /// Reads the buffer's whole capacity at most.
    pub async fn read_at_fixed(&self, buf: FixedBuf, offset: u64) -> (io::Result<usize>, FixedBuf) {
        if let Err(e) = check_offset(offset) {
            return (Err(e), buf);
        }
        let fixed = Reactor::with_current(|r| buf.registered_with(r)).unwrap_or(false);
        let read = ReadAt {
            fd: self.fd.clone(),
            buf,
            offset,
        };
        run(ReadAtFixed { read, fixed }).await
    }

    /// [`write_at`](Self::write_at) of a buffer of a [`FixedBufPool`] (its `len()` bytes): a
    /// `WRITE_FIXED` when the write goes to the ring (an `O_DIRECT` file, or a file system
    /// with non-blocking buffered writes) and the pool is registered with the reactor running
    /// this task, otherwise exactly `write_at`.
    pub async fn write_at_fixed(
        &self,
        buf: FixedBuf,
        offset: u64,
    ) -> (io::Result<usize>, FixedBuf) {
        if let Err(e) = check_offset(offset) {
            return (Err(e), buf);
        }
        let fixed = Reactor::with_current(|r| buf.registered_with(r)).unwrap_or(false);
        let write = WriteAt {
            fd: self.fd.clone(),
            buf,
            offset,
        };
        run(WriteAtFixed { write, fixed }).await
    }

    /// Writes all of `buf` at `offset`, looping over short writes.
    ///
    /// # Errors
    /// As [`write_at`](Self::write_at); `InvalidInput` if the range would end past
    /// `i64::MAX`; `WriteZero` if the kernel wrote nothing.
    pub async fn write_all_at(&self, buf: Vec<u8>, offset: u64) -> (io::Result<()>, Vec<u8>) {
        if offset.checked_add(buf.len() as u64).is_none() {
            return (Err(offset_error(offset)), buf);
        }
        write_all(buf, |rest, done| self.write_at(rest, offset + done)).await
    }

    /// Reads into several buffers at `offset` (`preadv`): the first is filled first.
    pub async fn readv_at<B: IoBufMut + Send>(
        &self,
        bufs: Vec<B>,
        offset: u64,
    ) -> (io::Result<usize>, Vec<B>) {
        if let Err(e) = check_offset(offset).and_then(|()| check_iovecs(bufs.len())) {
            return (Err(e), bufs);
        }
        let fd = self.fd.clone();
        run(ReadvAt(Vectored::new(fd, bufs, offset))).await
    }

    /// Writes several buffers at `offset` (`pwritev`).
    pub async fn writev_at<B: IoBuf + Send>(
        &self,
        bufs: Vec<B>,
        offset: u64,
    ) -> (io::Result<usize>, Vec<B>) {
        if let Err(e) = check_offset(offset).and_then(|()| check_iovecs(bufs.len())) {
            return (Err(e), bufs);
        }
        let fd = self.fd.clone();
        run(WritevAt(Vectored::new(fd, bufs, offset))).await
    }

    /// Flushes data and metadata to the device (`fsync`).
    pub async fn fsync(&self) -> io::Result<()> {
        self.sync(false).await
    }

    /// Flushes data (and the metadata needed to read it back) to the device (`fdatasync`).
    pub async fn fdatasync(&self) -> io::Result<()> {
        self.sync(true).await
    }

    /// Changes the space allocated to a byte range (`fallocate(2)`): `mode` 0 allocates (and
    /// extends the file), `libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE` deallocates
    /// (the range reads back as zeros), `libc::FALLOC_FL_ZERO_RANGE` zeroes it. An io_uring
    /// operation on the uring backend, the thread pool on epoll.
    ///
    /// # Errors
    /// `fallocate`'s: `EOPNOTSUPP` when the file system lacks `mode`, `EINVAL` for a zero `len`
    /// or an offset or length that does not fit an `off_t`, `EBADF` for a read-only file.
    ///
    /// ```
    /// # let r = reactor::Reactor::new()?;
    /// # let path = std::env::temp_dir().join(format!("fallocate-doc-{}", std::process::id()));
    /// r.block_on(async {
    ///     let f = reactor::fs::File::create(&path).await?;
    ///     f.fallocate(0, 0, 8192).await?; // allocates and extends
    ///     assert_eq!(std::fs::metadata(&path)?.len(), 8192);
    ///     # std::fs::remove_file(&path)?;
    ///     Ok::<(), std::io::Error>(())
    /// })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        if i64::try_from(offset).is_err() || i64::try_from(len).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fallocate: offset or length past i64::MAX",
            ));
        }
        let fd = self.fd.clone();
        run(Fallocate {
            fd,
            mode,
            offset,
            len,
        })
        .await
    }

    /// Tells the kernel how a byte range will be used (`posix_fadvise(2)`): for example
    /// `libc::POSIX_FADV_WILLNEED` starts reading it into the page cache and returns without
    /// waiting for that, `libc::POSIX_FADV_DONTNEED` drops its clean pages. `len` 0 means to
    /// the end of the file. An io_uring operation on the uring backend, the thread pool on
    /// epoll (a read-ahead can block while it queues the reads).
    ///
    /// # Errors
    /// `posix_fadvise`'s: `EINVAL` for an unknown `advice`, `ESPIPE` for a pipe;
    /// `InvalidInput` for an offset past the largest a file can have.
    ///
    /// ```
    /// # let r = reactor::Reactor::new()?;
    /// # let path = std::env::temp_dir().join(format!("fadvise-doc-{}", std::process::id()));
    /// # std::fs::write(&path, vec![7u8; 65536])?;
    /// r.block_on(async {
    ///     let f = reactor::fs::File::open(&path).await?;
    ///     f.fadvise(0, 65536, libc::POSIX_FADV_WILLNEED).await?;
    ///     let e = f.fadvise(0, 0, 4242).await.unwrap_err();
    ///     assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    ///     # std::fs::remove_file(&path)?;
    ///     Ok::<(), std::io::Error>(())
    /// })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn fadvise(&self, offset: u64, len: u32, advice: i32) -> io::Result<()> {
        check_offset(offset)?;
        let fd = self.fd.clone();
        run(Fadvise {
            fd,
            offset,
            len,
            advice,
        })
        .await
    }

    async fn sync(&self, data_only: bool) -> io::Result<()> {
        let fd = self.fd.clone();
        run(Fsync { fd, data_only }).await
    }
}

impl AsFd for File {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for File {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The largest file offset (`off_t` is signed; io_uring reads `u64::MAX` as "the file
/// position", so a larger value must never reach either backend).
const MAX_OFFSET: u64 = i64::MAX as u64;

fn offset_error(offset: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("file offset {offset} is past the largest offset a file can have (2^63 - 1)"),
    )
}

/// `InvalidInput` for an offset no file can have.
fn check_offset(offset: u64) -> io::Result<()> {
    if offset > MAX_OFFSET {
        return Err(offset_error(offset));
    }
    Ok(())
}

/// `InvalidInput` for more buffers than one vectored call takes (`IOV_MAX`, 1024 on Linux).
fn check_iovecs(n: usize) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    if n > IOV_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{n} buffers in one vectored call; at most {IOV_MAX}"),
        ));
    }
    Ok(())
}
