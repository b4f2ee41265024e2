//! The provided-buffer ring of multishot receives (`IORING_REGISTER_PBUF_RING`, Linux 5.19):
//! the buffers the kernel picks from when data arrives on a socket with a multishot `RECV`
//! armed, and the ring of entries through which they are handed (back) to the kernel.
//!
//! One per io_uring reactor, created on first use. A buffer is in one of two places: in the
//! ring, where the kernel may pick it (and write into it) at any time; or *out*, delivered in a
//! completion and owned by the stream that received it until that stream gives it back. The
//! memory is freed only when the last owner lets go of the ring, which the reactor arranges to
//! happen after every receive was cancelled and the registration dropped (or the ring closed).

use std::alloc::Layout;
use std::cell::Cell;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// The buffer group of the reactor's ring (one group per reactor).
pub(crate) const RECV_GROUP: u16 = 0;

/// The provided-buffer ring: entries, buffers and the bookkeeping of which are out.
pub(crate) struct RecvRing {
    entries: *mut BufRingEntry,
    entries_layout: Layout,
    bufs: *mut u8,
    bufs_layout: Layout,
    count: u16,
    size: u32,
    /// Our copy of the ring's tail (published to the kernel by a release store).
    tail: Cell<u16>,
    /// Buffers delivered in completions and not given back yet.
    out: Cell<u32>,
    /// Whether the kernel honours a multishot receive's total byte limit (Linux 6.17), until
    /// a receive found out it does not.
    byte_limit: Cell<bool>,
}

impl RecvRing {
    /// Allocates `count` (a power of two, at most 32768) buffers of `size` bytes each, all in
    /// the ring (to be registered by the caller at [`addr`](Self::addr)).
    pub(crate) fn new(count: u16, size: u32) -> std::io::Result<RecvRing> {
        assert!(
            count.is_power_of_two() && count <= 32768,
            "a power of two up to 32768"
        );
        assert!(size > 0, "buffers of at least one byte");
        let entries_layout =
            Layout::from_size_align(usize::from(count) * size_of::<BufRingEntry>(), 4096)
                .map_err(std::io::Error::other)?;
        let bufs_layout = Layout::from_size_align(usize::from(count) * size as usize, 4096)
            .map_err(std::io::Error::other)?;
        // SAFETY: both layouts have a non-zero size. Zeroed entries: the tail (in entry 0's
        // reserved field) starts at 0.
        let entries = unsafe { std::alloc::alloc_zeroed(entries_layout) }.cast::<BufRingEntry>();
        if entries.is_null() {
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        // SAFETY: as above.
        let bufs = unsafe { std::alloc::alloc(bufs_layout) };
        if bufs.is_null() {
            // SAFETY: allocated just above with this layout.
            unsafe { std::alloc::dealloc(entries.cast(), entries_layout) };
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        let ring = RecvRing {
            entries,
            entries_layout,
            bufs,
            bufs_layout,
            count,
            size,
            tail: Cell::new(0),
            out: Cell::new(0),
            byte_limit: Cell::new(true),
        };
        for bid in 0..count {
            ring.put(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// The address of the entries, for the registration.
    pub(crate) fn addr(&self) -> u64 {
        self.entries as u64
    }

    /// Number of buffers.
    pub(crate) fn count(&self) -> u16 {
        self.count
    }

    /// Buffers out of the ring (delivered, not given back).
    pub(crate) fn held(&self) -> u32 {
        self.out.get()
    }

    /// Whether receives into this ring may carry a total byte limit (`optlen`): true until
    /// [`no_byte_limit`](Self::no_byte_limit).
    pub(crate) fn byte_limit_works(&self) -> bool {
        self.byte_limit.get()
    }

    /// The kernel refused a receive's byte limit (`EINVAL`: before Linux 6.17).
    pub(crate) fn no_byte_limit(&self) {
        if self.byte_limit.replace(false) {
            tracing::info!(
                "reactor: this kernel has no byte limit for multishot receives (Linux 6.17); a stream's share of the receive ring is then kept by cancelling its receive and copying out what arrives meanwhile"
            );
        }
    }

    /// Buffers in the ring, available to the kernel.
    pub(crate) fn available(&self) -> u32 {
        u32::from(self.count) - self.out.get()
    }

    /// A completion delivered buffer `bid`: it is out until given back.
    pub(crate) fn took(&self, bid: u16) {
        debug_assert!(bid < self.count);
        self.out.set(self.out.get() + 1);
    }

    /// The bytes `off..off + len` of buffer `bid`.
    ///
    /// # Safety
    /// The buffer is out (delivered by a completion and not given back), and `off + len` is
    /// within what that completion reported.
    pub(crate) unsafe fn data(&self, bid: u16, off: u32, len: u32) -> &[u8] {
        assert!(bid < self.count && off.checked_add(len).is_some_and(|e| e <= self.size));
        // SAFETY: in bounds (checked); the kernel no longer writes to a buffer that is out,
        // and the caller's completion initialised these bytes.
        unsafe {
            std::slice::from_raw_parts(
                self.bufs
                    .add(usize::from(bid) * self.size as usize + off as usize),
                len as usize,
            )
        }
    }

    /// Gives buffer `bid` back to the kernel.
    pub(crate) fn give(&self, bid: u16) {
        assert!(self.out.get() > 0, "a buffer given back twice");
        self.out.set(self.out.get() - 1);
        self.put(bid);
        self.publish();
    }

    /// Writes buffer `bid` at the tail (not yet published).
    fn put(&self, bid: u16) {
        assert!(bid < self.count);
        let tail = self.tail.get();
        let i = usize::from(tail & (self.count - 1));
        // SAFETY: `i` is within the ring. The setters write the address, length and id only,
        // never the reserved field that is the tail in entry 0; the kernel reads an entry only
        // once the tail published past it, and this one is not yet.
        let e = unsafe { &mut *self.entries.add(i) };
        // SAFETY: within the buffers' allocation.
        e.set_addr(unsafe { self.bufs.add(usize::from(bid) * self.size as usize) } as u64);
        e.set_len(self.size);
        e.set_bid(bid);
        self.tail.set(tail.wrapping_add(1));
    }

    /// Publishes the tail: the entries written before become visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field of entry 0 of this (initialised) ring.
        let tail = unsafe { BufRingEntry::tail(self.entries) }.cast_mut();
        // SAFETY: a u16 that the kernel reads concurrently; only this thread writes it, and
        // only atomically.
        let tail = unsafe { AtomicU16::from_ptr(tail) };
        // Release: pairs with the kernel's acquire load of the tail (`smp_load_acquire` in
        // `io_ring_buffer_select`), so that it reads the entries written before.
        tail.store(self.tail.get(), Ordering::Release);
    }
}

impl Drop for RecvRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts. The reactor drops its share only after
        // every receive was cancelled and completed and the registration was dropped (or the
        // ring closed), so the kernel no longer reads the entries or writes the buffers.
        unsafe {
            std::alloc::dealloc(self.entries.cast(), self.entries_layout);
            std::alloc::dealloc(self.bufs, self.bufs_layout);
        }
    }
}

impl std::fmt::Debug for RecvRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvRing")
            .field("count", &self.count)
            .field("size", &self.size)
            .field("available", &self.available())
            .finish()
    }
}
