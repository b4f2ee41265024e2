//! Where a file has data and where it has holes, from `lseek(SEEK_DATA/SEEK_HOLE)`: what
//! `base:allocation` block status and sparse READ replies are made of.
//!
//! The calls run inline on the connection's thread. Each is a lookup in the file system's
//! extent tree (and, for unwritten extents, the page cache), without reading data, but not
//! bounded by the range asked about: `SEEK_HOLE` walks the extents up to the next hole,
//! which in a fully allocated file is its end (and a cold extent tree is read from disk).
//! So the export remembers the last data region found ([`DataRegion`]) and answers ranges
//! inside it without a call. While another thread's write to the file sleeps in dirty-page
//! throttling it holds the inode lock that the call takes too (on ext4); measured with
//! `bench/scripts/dirty-stall.py`, a QD1 client's BLOCK_STATUS then took up to 19–24 ms (p99
//! 0.75–1.1 ms) over six runs, no longer than its READs did. A file whose file system cannot tell (`EINVAL`,
//! `EOPNOTSUPP`, as for some block devices) is all data, which is always a correct answer:
//! "data" promises nothing about the contents.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

/// One run of the file: `len` bytes that are all data or all hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) len: u64,
    pub(crate) hole: bool,
}

/// The last data region `SEEK_HOLE` found in an export's file, `[start, end)`, shared by
/// its connections. A range inside it is answered as data without a system call. Only data
/// is remembered, so a stale region (a TRIM punched a hole in it since) can only make a
/// hole read as data, which is always a correct answer; TRIM and WRITE_ZEROES forget it
/// anyway, so that holes they make are seen.
#[derive(Debug, Default)]
pub(crate) struct DataRegion(Mutex<(u64, u64)>);

impl DataRegion {
    fn get(&self) -> (u64, u64) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, start: u64, end: u64) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = (start, end);
    }

    /// Forgets the region (after a hole may have been made in it).
    pub(crate) fn forget(&self) {
        self.set(0, 0);
    }
}

fn seek(fd: i32, pos: u64, whence: i32) -> io::Result<u64> {
    // SAFETY: lseek on an fd the caller keeps open; it touches no memory of ours.
    let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// The extent that starts at `pos`, cut at `end`.
fn extent_at(fd: i32, known: &DataRegion, pos: u64, end: u64) -> io::Result<Extent> {
    let data = |until: u64| Extent {
        len: until.min(end) - pos,
        hole: false,
    };
    let (start, stop) = known.get();
    if start <= pos && pos < stop {
        return Ok(data(stop));
    }
    match seek(fd, pos, libc::SEEK_HOLE) {
        Ok(h) if h > pos => {
            known.set(pos, h);
            Ok(data(h))
        }
        // In a hole: it lasts until the next data, or to the end of the file.
        Ok(_) => match seek(fd, pos, libc::SEEK_DATA) {
            Ok(d) if d > pos => Ok(Extent {
                len: d.min(end) - pos,
                hole: true,
            }),
            // A write filled the hole between the two calls (another connection's, or one
            // in flight): data from here, as far as anyone can tell without asking again.
            Ok(_) => Ok(data(end)),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(Extent {
                len: end - pos,
                hole: true,
            }),
            Err(e) => Err(e),
        },
        // The file system cannot tell, or `pos` is past the end of a file that shrank under
        // the export (a READ there fails on its own): call it data.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENXIO)
            ) =>
        {
            Ok(data(end))
        }
        Err(e) => Err(e),
    }
}

/// Calls `each` with the extents of `[offset, offset + len)` in order, at most `max` of them;
/// returns the bytes covered (less than `len` when `max` was reached first). Neighbouring
/// extents of the same kind are merged, so the extents alternate.
///
/// # Errors
/// An `lseek` error other than those that mean "cannot tell" (see the module docs).
pub(crate) fn walk(
    file: &impl AsRawFd,
    known: &DataRegion,
    offset: u64,
    len: u64,
    max: usize,
    mut each: impl FnMut(Extent),
) -> io::Result<u64> {
    let fd = file.as_raw_fd();
    let end = offset + len;
    let mut pos = offset;
    let mut pending: Option<Extent> = None;
    let mut count = 0;
    while pos < end {
        let e = extent_at(fd, known, pos, end)?;
        debug_assert!(e.len > 0, "an empty extent at {pos}");
        pos += e.len;
        match &mut pending {
            Some(p) if p.hole == e.hole => p.len += e.len,
            Some(p) => {
                if count + 1 == max {
                    // This one is the last allowed: the walk ends where it ends.
                    pos -= e.len;
                    break;
                }
                each(*p);
                count += 1;
                *p = e;
            }
            None => pending = Some(e),
        }
    }
    if let Some(p) = pending {
        each(p);
    }
    Ok(pos - offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A 1 MiB file with data at [64 KiB, 128 KiB) and [512 KiB, 576 KiB), holes elsewhere;
    /// `None` when the file system here does not report holes.
    fn sparse_file(tag: &str) -> Option<(std::fs::File, std::path::PathBuf)> {
        let path = std::env::temp_dir().join(format!("extents-{tag}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 65536], 65536).unwrap();
        f.write_all_at(&[2u8; 65536], 512 << 10).unwrap();
        f.sync_all().unwrap();
        let first = seek(f.as_raw_fd(), 0, libc::SEEK_DATA).ok();
        (first == Some(65536)).then_some((f, path))
    }

    #[test]
    fn holes_and_data_in_order_and_cut_at_the_range() {
        let Some((f, path)) = sparse_file("order") else {
            panic!("the temporary directory's file system must report holes for this test");
        };
        let mut v = Vec::new();
        let n = walk(&f, &DataRegion::default(), 0, 1 << 20, 100, |e| {
            v.push((e.len >> 10, e.hole))
        })
        .unwrap();
        assert_eq!(n, 1 << 20);
        assert_eq!(
            v,
            [
                (64, true),
                (64, false),
                (384, true),
                (64, false),
                (448, true)
            ]
        );
        // A range that starts and ends inside extents is cut to it.
        v.clear();
        walk(&f, &DataRegion::default(), 100 << 10, 500 << 10, 100, |e| {
            v.push((e.len >> 10, e.hole))
        })
        .unwrap();
        assert_eq!(v, [(28, false), (384, true), (64, false), (24, true)]);
        // At most `max` extents: the bytes covered say where the walk stopped.
        v.clear();
        let n = walk(&f, &DataRegion::default(), 0, 1 << 20, 2, |e| {
            v.push((e.len >> 10, e.hole))
        })
        .unwrap();
        assert_eq!((n >> 10, &v[..]), (128, &[(64, true), (64, false)][..]));
        v.clear();
        let n = walk(&f, &DataRegion::default(), 0, 1 << 20, 1, |e| {
            v.push((e.len >> 10, e.hole))
        })
        .unwrap();
        assert_eq!((n >> 10, &v[..]), (64, &[(64, true)][..]));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_remembered_data_region_is_answered_without_asking_until_forgotten() {
        let Some((f, path)) = sparse_file("remembered") else {
            panic!("the temporary directory's file system must report holes for this test");
        };
        let known = DataRegion::default();
        let mut v = Vec::new();
        walk(&f, &known, 64 << 10, 16 << 10, 10, |e| {
            v.push((e.len >> 10, e.hole))
        })
        .unwrap();
        assert_eq!((v, known.get()), (vec![(16, false)], (64 << 10, 128 << 10)));
        // Pretend the file changed: a region remembered over a hole is believed (data is
        // always a correct answer) until forgotten.
        known.set(0, 128 << 10);
        let mut v = Vec::new();
        walk(&f, &known, 0, 128 << 10, 10, |e| {
            v.push((e.len >> 10, e.hole))
        })
        .unwrap();
        assert_eq!(v, [(128, false)]);
        known.forget();
        let mut v = Vec::new();
        walk(&f, &known, 0, 128 << 10, 10, |e| {
            v.push((e.len >> 10, e.hole))
        })
        .unwrap();
        assert_eq!(v, [(64, true), (64, false)]);
        std::fs::remove_file(path).unwrap();
    }
}
