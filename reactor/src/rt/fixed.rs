//! Registered (fixed) buffers: [`FixedBufPool`] and its [`FixedBuf`]s, for
//! [`File::read_at_fixed`](crate::fs::File::read_at_fixed) and
//! [`File::write_at_fixed`](crate::fs::File::write_at_fixed).

use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use crate::event_loop::Reactor;
use crate::io::{AlignedBuf, IoBuf, IoBufMut};

/// The most buffers io_uring takes in one fixed-buffer table.
pub const MAX_FIXED_BUFFERS: usize = 16384;

/// A set of equal, aligned buffers registered once with a reactor's ring, as QEMU registers
/// guest RAM: reads and writes through [`File::read_at_fixed`](crate::fs::File::read_at_fixed)
/// and [`File::write_at_fixed`](crate::fs::File::write_at_fixed) then name a buffer by index
/// (`READ_FIXED`/`WRITE_FIXED`), and the kernel does not map and pin its pages for each
/// operation. On the epoll backend nothing is registered and the same calls are ordinary
/// reads and writes, so code using a pool runs on both backends.
///
/// A ring has one fixed-buffer table, so a reactor has at most one pool registered at a time
/// (on epoll too, so that code behaves the same on both backends). The registration ends when
/// the pool, every [`FixedBuf`] taken from it and every operation using one are gone: at once
/// if that happens inside the reactor's loop (in a task, a BH, a callback), otherwise when the
/// next pool is registered on the reactor or the reactor is dropped. The pool's memory lives
/// until then (the reactor keeps it).
///
/// A fixed buffer changes how the kernel finds the memory, not where the operation runs: a
/// read the page cache can serve is still copied on the loop thread at once, and a buffered
/// write that the file system cannot do without blocking still goes to the thread pool (see
/// [`File::read_at`](crate::fs::File::read_at)); the rest uses the registered buffer.
///
/// Cloning a pool gives another handle to the same buffers. Taking and returning a buffer
/// takes a short lock (the free list is shared with the threads an epoll reactor's operations
/// run on); reading and writing with it takes none.
///
/// ```
/// use reactor::{Reactor, fs::{File, FixedBufPool}};
/// let r = Reactor::new()?;
/// let pool = FixedBufPool::new(&r, 4, 4096, 4096)?;
/// let path = std::env::temp_dir().join(format!("fixed-doc-{}", std::process::id()));
/// r.block_on(async {
///     let f = File::create(&path).await?;
///     let mut buf = pool.try_take().expect("a free buffer");
///     buf.fill(b'x');
///     let (res, buf) = f.write_at_fixed(buf, 0).await;
///     assert_eq!(res?, 4096);
///     drop(buf); // back to the pool
///     let (res, buf) = f.read_at_fixed(pool.try_take().unwrap(), 0).await;
///     assert_eq!(res?, 4096);
///     assert!(buf.iter().all(|&b| b == b'x'));
///     Ok::<(), std::io::Error>(())
/// })?;
/// std::fs::remove_file(&path)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct FixedBufPool {
    inner: Arc<Inner>,
}

struct Inner {
    /// The free buffers with their index in the ring's table.
    free: Mutex<Vec<(u16, AlignedBuf)>>,
    /// Where the buffers go when the pool is dropped without its registration being dropped
    /// (away from the reactor's loop); the reactor holds it until it unregisters them.
    keep: Arc<Mutex<Vec<AlignedBuf>>>,
    count: usize,
    size: usize,
    /// Known to the reactor as the registration's owner (see `event_loop/fixed_table.rs`).
    owner: Arc<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Every buffer is back in `free` (each `FixedBuf` holds this `Inner`), so none is in
        // use; the registration goes before the memory does.
        let owner = Arc::as_ptr(&self.owner);
        let unregistered = Reactor::with_current(|r| r.unregister_fixed_buffers(owner));
        if unregistered != Some(true) {
            let bufs = self.lock().drain(..).map(|(_, b)| b).collect::<Vec<_>>();
            *self.keep.lock().unwrap_or_else(|p| p.into_inner()) = bufs;
        }
    }
}

impl FixedBufPool {
    /// Allocates `count` zeroed buffers of `size` bytes aligned to `align` (4096 suits
    /// `O_DIRECT`) and registers them with `r`'s ring.
    ///
    /// # Errors
    /// `InvalidInput` for a `count` of 0 or over [`MAX_FIXED_BUFFERS`], a `size` of 0 or over
    /// 1 GiB (io_uring's limit per buffer), or an `align` that is not a power of two;
    /// `AlreadyExists` while another pool is registered on `r`; the kernel's error otherwise,
    /// for example `ENOMEM` when the buffers exceed the locked-memory limit
    /// (`RLIMIT_MEMLOCK`; io_uring pins registered pages).
    pub fn new(r: &Reactor, count: usize, size: usize, align: usize) -> io::Result<FixedBufPool> {
        if count == 0 || count > MAX_FIXED_BUFFERS || size == 0 || size > 1 << 30 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a fixed buffer pool needs 1 to {MAX_FIXED_BUFFERS} buffers of 1 byte to 1 GiB (asked: {count} of {size})"
                ),
            ));
        }
        let mut bufs = Vec::with_capacity(count);
        for i in 0..count {
            bufs.push((i as u16, AlignedBuf::try_new(size, align)?));
        }
        let iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|(_, b)| libc::iovec {
                iov_base: b.stable_mut_ptr().cast(),
                iov_len: size,
            })
            .collect();
        let owner = Arc::new(());
        let keep = Arc::new(Mutex::new(Vec::new()));
        // SAFETY: the buffers live in `Inner`, which holds `owner`; when `Inner` is dropped
        // they are freed only if the registration was dropped, and otherwise move into `keep`,
        // which the reactor holds until it drops the registration.
        unsafe { r.register_fixed_buffers(&iovs, &owner, keep.clone()) }?;
        bufs.reverse(); // so that `try_take` hands out index 0 first
        Ok(FixedBufPool {
            inner: Arc::new(Inner {
                free: Mutex::new(bufs),
                keep,
                count,
                size,
                owner,
            }),
        })
    }

    /// A free buffer, or `None` when every buffer is taken. Its length is its capacity; its
    /// bytes are what its last user left (zeros at first).
    pub fn try_take(&self) -> Option<FixedBuf> {
        let (index, mut buf) = self.inner.lock().pop()?;
        buf.resize(buf.capacity());
        Some(FixedBuf {
            buf: Some(buf),
            index,
            pool: self.inner.clone(),
        })
    }

    /// How many buffers are free.
    pub fn available(&self) -> usize {
        self.inner.lock().len()
    }

    /// How many buffers the pool has.
    pub fn count(&self) -> usize {
        self.inner.count
    }

    /// The size of each buffer.
    pub fn buffer_size(&self) -> usize {
        self.inner.size
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u16, AlignedBuf)>> {
        // A panic while the list was held cannot leave it inconsistent (push and pop only).
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl fmt::Debug for FixedBufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedBufPool")
            .field("count", &self.inner.count)
            .field("buffer_size", &self.inner.size)
            .field("available", &self.available())
            .finish()
    }
}

/// A buffer taken from a [`FixedBufPool`]; dropping it gives it back. It derefs to its bytes
/// (`len()` of them: all of its capacity when taken, what a read filled after one) and works
/// as an ordinary [`IoBuf`]/[`IoBufMut`] too.
pub struct FixedBuf {
    /// `Some` until the drop gives it back.
    buf: Option<AlignedBuf>,
    index: u16,
    pool: Arc<Inner>,
}

impl FixedBuf {
    /// Its index in the ring's fixed-buffer table.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Its capacity (the pool's buffer size).
    pub fn capacity(&self) -> usize {
        self.aligned().capacity()
    }

    /// Sets the length, up to the capacity (what a write sends).
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn resize(&mut self, len: usize) {
        self.aligned_mut().resize(len);
    }

    /// Whether `r` has this buffer's pool registered, so that its index can be used on `r`'s
    /// ring.
    pub(crate) fn registered_with(&self, r: &Reactor) -> bool {
        r.has_fixed_buffers(&self.pool.owner)
    }

    fn aligned(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("present until the drop")
    }

    fn aligned_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("present until the drop")
    }
}

impl Drop for FixedBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.lock().push((self.index, buf));
        }
    }
}

impl Deref for FixedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.aligned()
    }
}

impl DerefMut for FixedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.aligned_mut()
    }
}

impl fmt::Debug for FixedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedBuf")
            .field("index", &self.index)
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}

// SAFETY: the aligned buffer's heap block does not move with the `FixedBuf`.
unsafe impl IoBuf for FixedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.aligned().stable_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.aligned().bytes_init()
    }
}

// SAFETY: as for `IoBuf`; the room is the aligned buffer's.
unsafe impl IoBufMut for FixedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.aligned_mut().stable_mut_ptr()
    }

    fn bytes_total(&self) -> usize {
        self.aligned().bytes_total()
    }

    unsafe fn set_init(&mut self, n: usize) {
        // SAFETY: the caller's guarantee is passed on.
        unsafe { self.aligned_mut().set_init(n) }
    }
}
