//! Owned buffers for operations the kernel performs while the caller waits: the operation
//! takes the buffer and gives it back with the result, `(io::Result<usize>, B)`, so the kernel
//! owns it while the operation is in flight, even if the future is dropped.

use std::alloc::{self, Layout};
use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A buffer whose bytes an operation can read while it owns the buffer.
///
/// # Safety
/// `stable_ptr` must point to `bytes_init` initialised bytes that stay at the same address
/// while the value is not accessed mutably, also after the value itself is moved.
pub unsafe trait IoBuf: Unpin + 'static {
    /// Start of the bytes.
    fn stable_ptr(&self) -> *const u8;
    /// Number of initialised bytes (what a write sends).
    fn bytes_init(&self) -> usize;
}

/// A buffer an operation can fill while it owns the buffer.
///
/// # Safety
/// As [`IoBuf`], and `stable_mut_ptr` must be valid for writes of `bytes_total` bytes.
pub unsafe trait IoBufMut: IoBuf {
    /// Start of the writable room.
    fn stable_mut_ptr(&mut self) -> *mut u8;
    /// Room in bytes (what a read may fill).
    fn bytes_total(&self) -> usize;
    /// Records that the first `n` bytes are initialised (after a read of `n` bytes).
    ///
    /// # Safety
    /// The first `n <= bytes_total()` bytes must have been written.
    unsafe fn set_init(&mut self, n: usize);
}

// SAFETY: a Vec's heap block does not move when the Vec is moved; its first `len` bytes are
// initialised and it has room for `capacity` bytes.
unsafe impl IoBuf for Vec<u8> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: see the `IoBuf` impl. Reads fill the Vec from its start; its length becomes what
// was read.
unsafe impl IoBufMut for Vec<u8> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn bytes_total(&self) -> usize {
        self.capacity()
    }
    unsafe fn set_init(&mut self, n: usize) {
        // SAFETY: the caller guarantees the first `n <= capacity` bytes were written.
        unsafe { self.set_len(n) };
    }
}

// SAFETY: a boxed slice's heap block does not move when the box is moved; it is all initialised.
unsafe impl IoBuf for Box<[u8]> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: see the `IoBuf` impl; its length is fixed, reads overwrite its first bytes.
unsafe impl IoBufMut for Box<[u8]> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn bytes_total(&self) -> usize {
        self.len()
    }
    unsafe fn set_init(&mut self, _n: usize) {}
}

// SAFETY: static data never moves.
unsafe impl IoBuf for &'static [u8] {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

/// A heap buffer aligned for `O_DIRECT` I/O (alignment a power of two, typically 512 or
/// 4096), zero-filled at creation. Its length can shrink and grow up to its capacity;
/// reads set it to the number of bytes read.
///
/// ```
/// use reactor::AlignedBuf;
/// let mut b = AlignedBuf::new(4096, 4096);
/// assert_eq!(b.as_ptr() as usize % 4096, 0);
/// b[..5].copy_from_slice(b"hello");
/// b.truncate(5);
/// assert_eq!(&b[..], b"hello");
/// ```
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    align: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (its capacity too), aligned to `align`.
    ///
    /// # Panics
    /// If `align` is not a power of two or `len` is 0 or too large for the address space
    /// (for sizes and alignments that come from outside, use [`try_new`](Self::try_new)).
    /// Like `Vec`, it aborts if the allocator has no memory to give.
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = Self::layout(len, align).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            cap: len,
            align,
        }
    }

    /// [`new`](Self::new) for a size or alignment the caller does not control: a bad one is
    /// an `InvalidInput` error, and a failed allocation an `OutOfMemory` error, never a panic
    /// or an abort.
    ///
    /// ```
    /// use reactor::AlignedBuf;
    /// use std::io::ErrorKind;
    /// assert_eq!(AlignedBuf::try_new(4096, 3).unwrap_err().kind(), ErrorKind::InvalidInput);
    /// assert_eq!(AlignedBuf::try_new(0, 512).unwrap_err().kind(), ErrorKind::InvalidInput);
    /// assert_eq!(AlignedBuf::try_new(1 << 62, 512).unwrap_err().kind(), ErrorKind::OutOfMemory);
    /// assert_eq!(AlignedBuf::try_new(8192, 512)?.len(), 8192);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// `InvalidInput` if `align` is not a power of two, `len` is 0, or `len` rounded up to
    /// `align` exceeds `isize::MAX`; `OutOfMemory` if the allocator returns nothing.
    pub fn try_new(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let layout = Self::layout(len, align)?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("no memory for an aligned buffer of {len} bytes"),
            )
        })?;
        Ok(AlignedBuf {
            ptr,
            len,
            cap: len,
            align,
        })
    }

    fn layout(len: usize, align: usize) -> io::Result<Layout> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "AlignedBuf needs a non-zero size",
            ));
        }
        Layout::from_size_align(len, align).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "AlignedBuf: alignment {align} is not a power of two, or {len} bytes is too large"
                ),
            )
        })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The alignment it was made with.
    pub fn alignment(&self) -> usize {
        self.align
    }

    /// Shortens it to `len` bytes (no effect if already shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Sets the length, up to the capacity; bytes past the old length keep their old (or zero)
    /// contents.
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn resize(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::resize past its capacity");
        self.len = len;
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, self.align),
            )
        };
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the first `len <= cap` bytes are initialised (zeroed at creation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("align", &self.align)
            .finish()
    }
}

// SAFETY: the allocation never moves; the first `len` bytes are initialised.
unsafe impl IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len
    }
}

// SAFETY: the whole capacity is allocated and zero-initialised, so any `n <= cap` is valid.
unsafe impl IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn bytes_total(&self) -> usize {
        self.cap
    }
    unsafe fn set_init(&mut self, n: usize) {
        self.len = n.min(self.cap);
    }
}

/// The part of a buffer from byte `begin` on (up to `end` if given), as a buffer of its own:
/// a write sends the initialised bytes in the range, a read fills the room in the range. It
/// lets a loop continue a short write, append a read behind bytes already there, or read
/// exactly a given count, without copying or allocating.
///
/// After a read of `n` bytes into a `Slice` of a `Vec`, the `Vec`'s length is `begin + n`.
///
/// ```
/// use reactor::io::Slice;
/// use reactor::{IoBuf, IoBufMut};
/// let s = Slice::new(b"header+body".to_vec(), 7);
/// assert_eq!(s.bytes_init(), 4);
/// assert_eq!(s.into_inner(), b"header+body");
/// let r = Slice::range(Vec::<u8>::with_capacity(100), 0, 10);
/// assert_eq!(r.bytes_total(), 10); // a read into it takes at most 10 bytes
/// ```
#[derive(Debug)]
pub struct Slice<B> {
    buf: B,
    begin: usize,
    end: usize,
}

impl<B: IoBuf> Slice<B> {
    /// `buf` from byte `begin` on.
    ///
    /// # Panics
    /// If `begin` exceeds `buf.bytes_init()`: the bytes before `begin` must be initialised.
    pub fn new(buf: B, begin: usize) -> Slice<B> {
        Slice::range(buf, begin, usize::MAX)
    }

    /// Bytes `begin..end` of `buf` (`end` may lie past the buffer's room: the room bounds it).
    ///
    /// # Panics
    /// If `begin` exceeds `buf.bytes_init()` or `end`.
    pub fn range(buf: B, begin: usize, end: usize) -> Slice<B> {
        assert!(
            begin <= buf.bytes_init() && begin <= end,
            "Slice: begin {begin} past the {} initialised bytes or past end {end}",
            buf.bytes_init()
        );
        Slice { buf, begin, end }
    }

    /// Where the slice starts in the whole buffer.
    pub fn begin(&self) -> usize {
        self.begin
    }

    /// The whole buffer.
    pub fn get_ref(&self) -> &B {
        &self.buf
    }

    /// Gives the whole buffer back.
    pub fn into_inner(self) -> B {
        self.buf
    }
}

// SAFETY: the bytes from `begin` (≤ the inner buffer's initialised count, checked in `range`
// and kept by `set_init`) up to `end` are initialised, stable bytes of the inner buffer.
unsafe impl<B: IoBuf> IoBuf for Slice<B> {
    fn stable_ptr(&self) -> *const u8 {
        self.buf.stable_ptr().wrapping_add(self.begin)
    }
    fn bytes_init(&self) -> usize {
        self.buf
            .bytes_init()
            .min(self.end)
            .saturating_sub(self.begin)
    }
}

// SAFETY: the room from `begin` up to `end` lies in the inner buffer's writable room;
// `set_init(n)` maps to the inner `set_init(begin + n)`, valid because the bytes before `begin`
// were initialised when the slice was made.
unsafe impl<B: IoBufMut> IoBufMut for Slice<B> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.buf.stable_mut_ptr().wrapping_add(self.begin)
    }
    fn bytes_total(&self) -> usize {
        self.buf
            .bytes_total()
            .min(self.end)
            .saturating_sub(self.begin)
    }
    unsafe fn set_init(&mut self, n: usize) {
        // SAFETY: bytes `..begin` were initialised at `range`, the caller vouches for the next
        // `n`.
        unsafe { self.buf.set_init(self.begin + n) };
    }
}
