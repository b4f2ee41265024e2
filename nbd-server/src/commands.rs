//! The work of each command once admitted: file I/O through `reactor::fs` (io_uring
//! operations on the uring backend, the thread pool on epoll), then the reply.

use std::io;

use reactor::io::Slice;

use crate::proto::{self, REPLY_LEN, Request, cflag, cmd, err};
use crate::session::Ticket;

/// A READ is read in pieces of at most this size, so that one for a client that went away
/// stops early.
const READ_CHUNK: usize = 1 << 20;

/// READ: the data goes straight into the reply buffer, behind the header.
pub(crate) async fn read(t: Ticket, req: Request) {
    let s = t.session();
    let end = REPLY_LEN + req.length as usize;
    if s.broken() {
        // Nobody will read the reply: don't do the work.
        return t.finish_with(err::EIO);
    }
    let mut buf = s.take_buf(end);
    buf.resize(REPLY_LEN, 0);
    let mut error = 0;
    while buf.len() < end {
        if s.broken() {
            error = err::EIO;
            break;
        }
        let done = buf.len() - REPLY_LEN;
        // In bounds: the request was checked against the export's size.
        let at = req.offset + done as u64;
        let range = Slice::range(
            buf,
            REPLY_LEN + done,
            end.min(REPLY_LEN + done + READ_CHUNK),
        );
        let (res, b) = s.export.file().read_at(range, at).await;
        buf = b.into_inner();
        match res {
            // The file shrank under the export.
            Ok(0) => error = err::EIO,
            Ok(_) => continue,
            Err(e) => error = proto::errno(&e),
        }
        break;
    }
    if error != 0 {
        // An error reply carries no data.
        s.recycle(buf);
        return t.finish_with(error);
    }
    proto::simple_reply(&mut buf, 0, req.handle);
    t.finish(buf);
}

/// WRITE: acknowledged once the kernel took all of it, and with FUA once it is on disk.
pub(crate) async fn write(t: Ticket, req: Request, payload: Vec<u8>) {
    let s = t.session();
    if s.broken() {
        // Never acknowledged, so never promised: a write for a client that is gone is
        // dropped like any request not yet started.
        s.recycle(payload);
        return t.finish_with(err::EIO);
    }
    let (res, payload) = s.export.file().write_all_at(payload, req.offset).await;
    s.recycle(payload);
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
    let (offset, len) = (req.offset, u64::from(req.length));
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

/// Writes `len` zero bytes at `offset` from one static block of zeros.
async fn write_zeros(s: &crate::session::Session, offset: u64, len: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        let (res, _) = s.export.file().write_at(&ZEROS[..n], offset + done).await;
        match res? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            k => done += k as u64,
        }
    }
    Ok(())
}
