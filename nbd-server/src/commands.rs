//! The work of each command once admitted: file I/O through `reactor::fs` (io_uring
//! operations on the uring backend, the thread pool on epoll), then the reply. READ is in
//! [`crate::read`].

use std::io;

use crate::extents;
use crate::proto::{self, Request, cflag, cmd, err};
use crate::session::Ticket;
use crate::structured::{BASE_ALLOCATION_ID, state};

pub(crate) use crate::read::read;

/// Extents reported by one BLOCK_STATUS reply at most (the client asks again from where it
/// ends). Each costs up to two `lseek` calls on the connection's thread, so this bounds the
/// time one request holds it.
const MAX_EXTENTS: usize = 512;

/// WRITE: acknowledged once the kernel took all of it, and with FUA once it is on disk.
pub(crate) async fn write(t: Ticket, req: Request, payload: Vec<u8>) {
    let s = t.session();
    if s.broken() {
        // Never acknowledged, so never promised: a write for a client that is gone is
        // dropped like any request not yet started.
        s.recycle(payload);
        return t.finish_with(err::EIO);
    }
    let res = match s.export.direct() {
        Some(d) => {
            let _span = d.lock(req.offset, payload.len() as u64).await;
            let res =
                crate::direct::write(d, s.export.file(), &s.aligned, &payload, req.offset).await;
            s.recycle(payload);
            res
        }
        None => {
            let (res, payload) = s.export.file().write_all_at(payload, req.offset).await;
            s.recycle(payload);
            res
        }
    };
    let mut error = res.err().map_or(0, |e| proto::errno(&e));
    if error == 0 && req.flags & cflag::FUA != 0 {
        error = s.sync().await.err().map_or(0, |e| proto::errno(&e));
    }
    t.finish_with(error);
}

/// FLUSH: `fdatasync`, which covers every write acknowledged before it.
pub(crate) async fn flush(t: Ticket) {
    if t.session().broken() {
        return t.finish_with(err::EIO);
    }
    let error = t
        .session()
        .sync()
        .await
        .err()
        .map_or(0, |e| proto::errno(&e));
    t.finish_with(error);
}

/// TRIM punches a hole (a hint: a file that cannot is not an error); WRITE_ZEROES punches a
/// hole or, with NO_HOLE, zeroes the range in place, and falls back to writing zeros where
/// the file cannot — unless FAST_ZERO asks for a quick `ENOTSUP` instead.
pub(crate) async fn discard_or_zero(t: Ticket, req: Request) {
    let s = t.session();
    if s.broken() {
        return t.finish_with(err::EIO);
    }
    let file = s.export.file();
    let (offset, len) = (req.offset, req.length);
    // On an O_DIRECT export, the blocks it touches are not being rewritten meanwhile.
    let span = match s.export.direct() {
        Some(d) => Some(d.lock(offset, len).await),
        None => None,
    };
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    let modes: &[i32] = match (req.kind, req.flags & cflag::NO_HOLE != 0) {
        (cmd::TRIM, _) => &[punch],
        (_, false) => &[punch, zero],
        (_, true) => &[zero],
    };
    let mut result = Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    for &mode in modes {
        result = file.fallocate(mode, offset, len).await;
        if !cannot_fallocate(&result) {
            break;
        }
    }
    // A hole may have been made where a data region was remembered.
    s.export.data_region.forget();
    let mut error = match result {
        Ok(()) => 0,
        Err(_) if cannot_fallocate(&result) => {
            if req.kind == cmd::TRIM {
                0
            } else if req.flags & cflag::FAST_ZERO != 0 {
                err::ENOTSUP
            } else {
                write_zeros(t.session(), offset, len)
                    .await
                    .err()
                    .map_or(0, |e| proto::errno(&e))
            }
        }
        Err(e) => proto::errno(&e),
    };
    drop(span);
    if error == 0 && req.flags & cflag::FUA != 0 {
        error = s.sync().await.err().map_or(0, |e| proto::errno(&e));
    }
    t.finish_with(error);
}

/// Whether `fallocate` failed because the file cannot do it (the file system lacks the mode;
/// a block device refuses a range not aligned to its sectors), not because of an I/O error.
fn cannot_fallocate(r: &io::Result<()>) -> bool {
    matches!(r, Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)))
}

/// Writes `len` zero bytes at `offset` from one static block of zeros; stops (with an
/// error nobody reads) once the client is gone, since with extended headers one request may
/// cover the whole export.
async fn write_zeros(s: &crate::session::Session, offset: u64, len: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut done = 0;
    while done < len {
        if s.broken() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        if let Some(d) = s.export.direct() {
            // Pieces that end on ZEROS-sized boundaries, so only the first and the last can
            // have a partial block to read.
            let at = offset + done;
            let n = n.min((ZEROS.len() as u64 - at % ZEROS.len() as u64) as usize);
            // The caller holds the span.
            let file = s.export.file();
            crate::direct::write(d, file, &s.aligned, &ZEROS[..n], offset + done).await?;
            done += n as u64;
            continue;
        }
        let (res, _) = s.export.file().write_at(&ZEROS[..n], offset + done).await;
        match res? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            k => done += k as u64,
        }
    }
    Ok(())
}

/// CACHE: starts reading the range (at most 32 MiB) into the page cache and replies without
/// waiting for the data: `POSIX_FADV_WILLNEED` in pieces of 1 MiB, since the kernel reads
/// ahead at most about one read-ahead window or device I/O size per call (measured here:
/// one 32 MiB call brought 8 MiB in; 2 MiB pieces brought all of it).
pub(crate) async fn cache(t: Ticket, req: Request) {
    const PIECE: u64 = 1 << 20;
    let s = t.session();
    let mut done = 0;
    while done < req.length {
        if s.broken() {
            return t.finish_with(err::EIO);
        }
        let n = (req.length - done).min(PIECE) as u32;
        let advice = libc::POSIX_FADV_WILLNEED;
        let res = s.export.file().fadvise(req.offset + done, n, advice).await;
        if let Err(e) = res {
            return t.finish_with(proto::errno(&e));
        }
        done += u64::from(n);
    }
    t.finish_with(0);
}

/// BLOCK_STATUS for `base:allocation`: the range's holes (`HOLE | ZERO`) and data (0), from
/// the request's offset, at most [`MAX_EXTENTS`] of them (one with `REQ_ONE`), never past
/// the request's end.
pub(crate) async fn block_status(t: Ticket, req: Request) {
    let s = t.session();
    if s.broken() {
        return t.finish_with(err::EIO);
    }
    let Some(to) = t.chunks() else {
        unreachable!("BLOCK_STATUS is admitted only with a meta context, so with chunks");
    };
    let max = if req.flags & cflag::REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    let mut descriptors = Vec::new();
    let known = &s.export.data_region;
    let res = extents::walk(s.export.file(), known, req.offset, req.length, max, |e| {
        let status = if e.hole { state::HOLE | state::ZERO } else { 0 };
        descriptors.push((e.len, status));
    });
    if let Err(e) = res {
        return t.finish_with(proto::errno(&e));
    }
    let mut buf = s.take_buf(to.header_len() + 8 + 16 * descriptors.len());
    to.block_status(&mut buf, BASE_ALLOCATION_ID, &descriptors);
    t.finish(buf);
}
