//! `O_DIRECT` exports (`--cache none`): the image is read and written around the page cache,
//! always with buffers, offsets and lengths aligned to what the file system asks for
//! (`statx`'s `STATX_DIOALIGN`). On io_uring every such operation goes through the ring; on
//! epoll through the reactor's pool.
//!
//! A client's request need not be aligned (the alignment is advertised with
//! `NBD_INFO_BLOCK_SIZE`, but a client may ignore it): a READ reads the aligned span around
//! it into an aligned buffer and copies the part asked for; a WRITE that does not cover whole
//! blocks reads the blocks at its edges, patches them, and writes the aligned span back.
//! Every change to the file (writes, zeroes, trims) holds the aligned span it touches in a
//! range lock for its duration, granted in the order the requests came (see
//! [`RangeLocks`]), so an edge block's read-modify-write cannot undo a concurrent write to
//! the same block, and overlapping writes land in the order they were sent.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::task::{Poll, Waker};

use reactor::AlignedBuf;
use reactor::io::Slice;

/// A READ or WRITE is moved in pieces of at most this many bytes (aligned buffers this size
/// at most).
const PIECE: usize = 1 << 20;
/// Aligned buffers kept for reuse by one connection, at most this many bytes.
const POOL_BYTES: usize = 1 << 20;

/// What an `O_DIRECT` export needs: its alignment and its range locks.
#[derive(Debug)]
pub(crate) struct Direct {
    align: u64,
    locks: RangeLocks,
}

impl Direct {
    pub(crate) fn new(align: u64) -> Direct {
        Direct {
            align,
            locks: RangeLocks::default(),
        }
    }

    /// The alignment of offsets, lengths and buffers.
    pub(crate) fn align(&self) -> u64 {
        self.align
    }

    /// `[offset, offset + len)` widened to whole blocks.
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = self.align;
        (offset / a * a, (offset + len).div_ceil(a) * a)
    }

    /// Waits for the aligned span around `[offset, offset + len)`, after every earlier
    /// request that overlaps it; the span is held until the guard drops.
    pub(crate) async fn lock(&self, offset: u64, len: u64) -> SpanGuard<'_> {
        let (start, end) = self.span(offset, len);
        self.locks.lock(start, end).await
    }
}

/// The alignment `O_DIRECT` I/O on `f` needs: the larger of `statx`'s memory and offset
/// alignments (Linux 6.1), at least 512; 4096 where the kernel or the file system does not
/// say.
///
/// # Errors
/// The file refuses `O_DIRECT` (`statx` reports it, or a first aligned read fails with
/// `EINVAL`).
pub(crate) fn alignment(f: &std::fs::File) -> io::Result<u64> {
    // SAFETY: an all-zero statx is a valid value of the plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd, an empty path with AT_EMPTY_PATH, and a valid out-pointer.
    let r = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        if stx.stx_dio_offset_align == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the file system does not support O_DIRECT on this file",
            ));
        }
        let a = stx.stx_dio_offset_align.max(stx.stx_dio_mem_align).max(512);
        return Ok(u64::from(a));
    }
    Ok(4096)
}

/// One held span of a [`RangeLocks`].
struct Held {
    start: u64,
    end: u64,
    ticket: u64,
    granted: bool,
    waker: Option<Waker>,
}

/// Locks on byte ranges of the export, shared by every connection (on any IoThread). A
/// request waits while any earlier request, granted or waiting, overlaps its span: requests
/// to overlapping spans are served in the order they asked, and disjoint ones side by side.
#[derive(Debug, Default)]
pub(crate) struct RangeLocks {
    state: Mutex<RangeState>,
}

#[derive(Default)]
struct RangeState {
    /// In arrival order.
    queue: Vec<Held>,
    next: u64,
}

impl std::fmt::Debug for RangeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} spans", self.queue.len())
    }
}

impl RangeState {
    /// Whether the span at `i` overlaps any earlier one (granted or waiting); stops at the
    /// first that does.
    fn blocked(&self, i: usize) -> bool {
        let (s, e) = (self.queue[i].start, self.queue[i].end);
        self.queue[..i].iter().any(|h| h.start < e && s < h.end)
    }

    /// After the span `[start, end)` left the queue: grants the waiting spans it was holding
    /// back that nothing earlier still overlaps, and wakes their tasks. Only spans that
    /// overlapped it can change, and each check stops at its first overlap, so a queue of
    /// requests to one block costs one step per waiter, not a scan each.
    fn release(&mut self, start: u64, end: u64) {
        for i in 0..self.queue.len() {
            let h = &self.queue[i];
            if h.granted || !(h.start < end && start < h.end) || self.blocked(i) {
                continue;
            }
            self.queue[i].granted = true;
            if let Some(w) = self.queue[i].waker.take() {
                w.wake();
            }
        }
    }
}

/// A granted span; released (and the next waiters granted) on drop, also when the request's
/// future is dropped while waiting.
pub(crate) struct SpanGuard<'a> {
    locks: &'a RangeLocks,
    ticket: u64,
}

impl Drop for SpanGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.locks.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = st.queue.iter().position(|h| h.ticket == self.ticket) else {
            return;
        };
        let h = st.queue.remove(i);
        st.release(h.start, h.end);
    }
}

impl RangeLocks {
    async fn lock(&self, start: u64, end: u64) -> SpanGuard<'_> {
        let ticket = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let ticket = st.next;
            st.next += 1;
            st.queue.push(Held {
                start,
                end,
                ticket,
                granted: false,
                waker: None,
            });
            let last = st.queue.len() - 1;
            st.queue[last].granted = !st.blocked(last);
            ticket
        };
        // Made before waiting, so a dropped wait gives its place back.
        let guard = SpanGuard {
            locks: self,
            ticket,
        };
        poll_fn(|cx| {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let h = st
                .queue
                .iter_mut()
                .find(|h| h.ticket == ticket)
                .expect("a span stays queued until its guard drops");
            if h.granted {
                Poll::Ready(())
            } else {
                h.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        guard
    }

    /// Spans queued (granted or waiting).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.state.lock().unwrap().queue.len()
    }
}

/// Aligned buffers kept by one connection for reuse.
#[derive(Debug, Default)]
pub(crate) struct AlignedPool {
    bufs: RefCell<Vec<AlignedBuf>>,
}

impl AlignedPool {
    /// A buffer of `len` bytes aligned to `align` (its contents are whatever it held).
    fn take(&self, len: usize, align: u64) -> io::Result<AlignedBuf> {
        let mut bufs = self.bufs.borrow_mut();
        if let Some(i) = bufs
            .iter()
            .position(|b| b.capacity() >= len && b.alignment() as u64 == align)
        {
            let mut b = bufs.swap_remove(i);
            b.resize(len);
            return Ok(b);
        }
        drop(bufs);
        AlignedBuf::try_new(len.max(1), align as usize)
    }

    fn give(&self, b: AlignedBuf) {
        let mut bufs = self.bufs.borrow_mut();
        let held: usize = bufs.iter().map(AlignedBuf::capacity).sum();
        if held + b.capacity() <= POOL_BYTES {
            bufs.push(b);
        }
    }
}

/// Reads `[at, at + len)` of the file (which may lie past its end: zeros there) into an
/// aligned buffer from `pool`; `at` and `len` must be aligned.
async fn read_aligned(
    file: &reactor::fs::File,
    pool: &AlignedPool,
    align: u64,
    at: u64,
    len: usize,
) -> io::Result<AlignedBuf> {
    let mut buf = pool.take(len, align)?;
    buf.truncate(0);
    let mut done = 0;
    while done < len {
        let (res, b) = file
            .read_at(Slice::range(buf, done, len), at + done as u64)
            .await;
        buf = b.into_inner();
        match res {
            Ok(0) => {
                // Past the end of the file: zeros.
                buf.resize(len);
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) => {
                pool.give(buf);
                return Err(e);
            }
        }
    }
    Ok(buf)
}

/// Reads the block of the file at `at` into `buf[off..off + align]` (zeros past the end of
/// the file); `buf` keeps its length. On an error the buffer goes back to `pool`.
async fn read_block(
    file: &reactor::fs::File,
    pool: &AlignedPool,
    buf: AlignedBuf,
    off: usize,
    at: u64,
) -> io::Result<AlignedBuf> {
    let len = buf.len();
    let a = buf.alignment();
    let mut buf = buf;
    buf.truncate(off);
    let (res, b) = file.read_at(Slice::range(buf, off, off + a), at).await;
    let mut buf = b.into_inner();
    let got = buf.len() - off;
    buf.resize(len);
    match res {
        // A short read is the end of the file: zeros after it.
        Ok(_) => {
            buf[off + got..off + a].fill(0);
            Ok(buf)
        }
        Err(e) => {
            pool.give(buf);
            Err(e)
        }
    }
}

/// Writes all of `buf` at `at` (aligned).
async fn write_aligned(
    file: &reactor::fs::File,
    buf: AlignedBuf,
    at: u64,
) -> (io::Result<()>, AlignedBuf) {
    let mut buf = buf;
    let mut done = 0;
    while done < buf.len() {
        let (res, b) = file.write_at(Slice::new(buf, done), at + done as u64).await;
        buf = b.into_inner();
        match res {
            Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
            Ok(n) => done += n,
            Err(e) => return (Err(e), buf),
        }
    }
    (Ok(()), buf)
}

/// Reads `[at, at + n)` (any alignment, within the export) and appends it to `dst`.
pub(crate) async fn read(
    d: &Direct,
    file: &reactor::fs::File,
    pool: &AlignedPool,
    dst: &mut Vec<u8>,
    at: u64,
    n: usize,
) -> io::Result<()> {
    let (start, end) = d.span(at, n as u64);
    let mut pos = start;
    while pos < end {
        let len = (end - pos).min(PIECE as u64) as usize;
        let buf = read_aligned(file, pool, d.align, pos, len).await?;
        // The part of this piece inside [at, at + n).
        let from = at.max(pos);
        let to = (at + n as u64).min(pos + len as u64);
        dst.extend_from_slice(&buf[(from - pos) as usize..(to - pos) as usize]);
        pool.give(buf);
        pos += len as u64;
    }
    Ok(())
}

/// Writes `data` at `at` (any alignment, within the export): aligned pieces straight from a
/// copy, edge blocks read, patched and written back. The caller holds the span's lock.
pub(crate) async fn write(
    d: &Direct,
    file: &reactor::fs::File,
    pool: &AlignedPool,
    data: &[u8],
    at: u64,
) -> io::Result<()> {
    let (start, end) = d.span(at, data.len() as u64);
    let mut pos = start;
    while pos < end {
        let len = (end - pos).min(PIECE as u64) as usize;
        let from = at.max(pos);
        let to = (at + data.len() as u64).min(pos + len as u64);
        // Whole blocks are overwritten; a partial block at either edge is read first.
        let mut buf = pool.take(len, d.align)?;
        let a = d.align as usize;
        if from > pos {
            buf = read_block(file, pool, buf, 0, pos).await?;
        }
        if to < pos + len as u64 && (from == pos || len > a) {
            buf = read_block(file, pool, buf, len - a, pos + (len - a) as u64).await?;
        }
        buf[(from - pos) as usize..(to - pos) as usize]
            .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
        let (res, buf) = write_aligned(file, buf, pos).await;
        pool.give(buf);
        res?;
        pos += len as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn spans_widen_to_whole_blocks() {
        let d = Direct::new(4096);
        assert_eq!(d.span(0, 4096), (0, 4096));
        assert_eq!(d.span(1, 1), (0, 4096));
        assert_eq!(d.span(4095, 2), (0, 8192));
        assert_eq!(d.span(8192, 0), (8192, 8192));
    }

    ::tests::backend_tests! {
        fn overlapping_spans_are_granted_in_order_and_disjoint_ones_at_once(r: &Reactor) {
            let locks = Arc::new(RangeLocks::default());
            let order = Arc::new(std::sync::Mutex::new(Vec::new()));
            let running = Arc::new(AtomicUsize::new(0));
            r.block_on(async {
                let first = locks.lock(0, 8192).await;
                // Disjoint: granted at once.
                let other = locks.lock(8192, 16384).await;
                let mut tasks = Vec::new();
                for i in 0..3 {
                    let (locks, order, running) = (locks.clone(), order.clone(), running.clone());
                    tasks.push(r.spawn_local(async move {
                        let _g = locks.lock(4096, 8192).await;
                        assert_eq!(running.fetch_add(1, Ordering::SeqCst), 0, "one at a time");
                        reactor::time::sleep(std::time::Duration::from_millis(2)).await;
                        order.lock().unwrap().push(i);
                        running.fetch_sub(1, Ordering::SeqCst);
                    }));
                    reactor::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                assert_eq!(locks.queued(), 5);
                assert!(order.lock().unwrap().is_empty(), "all wait for the first");
                drop(other);
                drop(first);
                for t in tasks {
                    t.await.expect("the task ran");
                }
            });
            assert_eq!(*order.lock().unwrap(), [0, 1, 2]);
            assert_eq!(locks.queued(), 0);
        }

        fn a_dropped_wait_gives_its_place_back(r: &Reactor) {
            let locks = RangeLocks::default();
            r.block_on(async {
                let first = locks.lock(0, 4096).await;
                let waiting = reactor::time::timeout(std::time::Duration::from_millis(5), locks.lock(0, 4096)).await;
                assert!(waiting.is_err(), "the overlapping span waits");
                assert_eq!(locks.queued(), 1, "the dropped wait left the queue");
                drop(first);
                let _again = locks.lock(0, 4096).await;
            });
        }
    }
}
