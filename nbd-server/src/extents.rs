//! Where a file has data and where it has holes, from `lseek(SEEK_DATA/SEEK_HOLE)`: what
//! `base:allocation` block status and sparse READ replies are made of.
//!
//! The calls run inline on the connection's thread: each is a lookup in the file system's
//! extent tree (and, for unwritten extents, the page cache), with no data I/O. A file whose
//! file system cannot tell (`EINVAL`, `EOPNOTSUPP`, as for some block devices) is all data,
//! which is always a correct answer: "data" promises nothing about the contents.

use std::io;
use std::os::fd::AsRawFd;

/// One run of the file: `len` bytes that are all data or all hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) len: u64,
    pub(crate) hole: bool,
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
fn extent_at(fd: i32, pos: u64, end: u64) -> io::Result<Extent> {
    let data = |until: u64| Extent {
        len: until.min(end) - pos,
        hole: false,
    };
    match seek(fd, pos, libc::SEEK_HOLE) {
        Ok(h) if h > pos => Ok(data(h)),
        // In a hole: it lasts until the next data, or to the end of the file.
        Ok(_) => match seek(fd, pos, libc::SEEK_DATA) {
            Ok(d) => Ok(Extent {
                len: d.min(end) - pos,
                hole: true,
            }),
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
        let e = extent_at(fd, pos, end)?;
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
        let n = walk(&f, 0, 1 << 20, 100, |e| v.push((e.len >> 10, e.hole))).unwrap();
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
        walk(&f, 100 << 10, 500 << 10, 100, |e| {
            v.push((e.len >> 10, e.hole))
        })
        .unwrap();
        assert_eq!(v, [(28, false), (384, true), (64, false), (24, true)]);
        // At most `max` extents: the bytes covered say where the walk stopped.
        v.clear();
        let n = walk(&f, 0, 1 << 20, 2, |e| v.push((e.len >> 10, e.hole))).unwrap();
        assert_eq!((n >> 10, &v[..]), (128, &[(64, true), (64, false)][..]));
        v.clear();
        let n = walk(&f, 0, 1 << 20, 1, |e| v.push((e.len >> 10, e.hole))).unwrap();
        assert_eq!((n >> 10, &v[..]), (64, &[(64, true)][..]));
        std::fs::remove_file(path).unwrap();
    }
}
