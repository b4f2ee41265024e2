//! READ: the data is read from the file straight into the reply buffer, behind its header.
//!
//! - With simple replies: one header, then the data.
//! - With structured replies: one data chunk; or, for a READ of at least [`SPARSE_MIN`]
//!   bytes without `NBD_CMD_FLAG_DF`, a data chunk per data extent and a hole chunk per hole
//!   (from `SEEK_HOLE`/`SEEK_DATA`), so a hole crosses the wire as one 32-byte chunk (44 with extended headers). An error is one
//!   error chunk and no data.

use reactor::io::Slice;

use crate::extents::{self, Extent};
use crate::proto::{self, REPLY_LEN, Request, cflag, err};
use crate::session::{Session, Ticket};
use crate::structured::{FLAG_DONE, ReplyTo};

/// A READ is read in pieces of at most this size, so that one for a client that went away
/// stops early.
const READ_CHUNK: usize = 1 << 20;

/// READs at least this long look for holes; shorter ones are sent as data without the
/// `lseek` calls, which would cost more than the zeros they could save.
pub const SPARSE_MIN: usize = 64 * 1024;

/// Extents looked up for one sparse READ at most; past them the rest of the range is one
/// more data chunk (it reads as zeros where it has holes), so a reply has at most 65 chunks.
const MAX_CHUNKS: usize = 64;

/// Reads the file from `at` into `buf` until it holds `end` bytes, in pieces of at most
/// [`READ_CHUNK`]; stops early when the client is gone. On an error the buffer goes back to
/// the pool and the NBD error comes back.
async fn fill(s: &Session, mut buf: Vec<u8>, at: u64, end: usize) -> Result<Vec<u8>, u32> {
    if let Some(d) = s.export.direct() {
        return fill_direct(s, d, buf, at, end).await;
    }
    let start = buf.len();
    let error = loop {
        if buf.len() >= end {
            return Ok(buf);
        }
        if s.broken() {
            break err::EIO;
        }
        let done = buf.len() - start;
        let range = Slice::range(buf, start + done, end.min(start + done + READ_CHUNK));
        // In bounds: the request was checked against the export's size.
        let (res, b) = s.export.file().read_at(range, at + done as u64).await;
        buf = b.into_inner();
        match res {
            // The file shrank under the export.
            Ok(0) => break err::EIO,
            Ok(_) => {}
            Err(e) => break proto::errno(&e),
        }
    };
    // An error reply carries no data.
    s.recycle(buf);
    Err(error)
}

/// [`fill`] for an `O_DIRECT` export: through aligned buffers, in pieces of at most
/// [`READ_CHUNK`].
async fn fill_direct(
    s: &Session,
    d: &crate::direct::Direct,
    mut buf: Vec<u8>,
    at: u64,
    end: usize,
) -> Result<Vec<u8>, u32> {
    let start = buf.len();
    while buf.len() < end {
        if s.broken() {
            s.recycle(buf);
            return Err(err::EIO);
        }
        let done = buf.len() - start;
        let n = (end - buf.len()).min(READ_CHUNK);
        let file = s.export.file();
        let res = crate::direct::read(d, file, &s.aligned, &mut buf, at + done as u64, n).await;
        if let Err(e) = res {
            s.recycle(buf);
            return Err(proto::errno(&e));
        }
    }
    Ok(buf)
}

/// READ, in whichever form the connection negotiated.
pub(crate) async fn read(t: Ticket, req: Request) {
    let s = t.session();
    if s.broken() {
        // Nobody will read the reply: don't do the work.
        return t.finish_with(err::EIO);
    }
    // At most MAX_PAYLOAD: checked when the request was read.
    let len = req.length as usize;
    let chunks = t.chunks();
    if let Some(to) = chunks
        && req.flags & cflag::DF == 0
        && len >= SPARSE_MIN
    {
        let map = allocation(s, &req);
        if map.len() > 1 || map[0].hole {
            return read_sparse(t, req, to, &map).await;
        }
    }
    let head = chunks.map_or(REPLY_LEN, |to| to.data_header_len());
    let mut buf = s.take_buf(head + len);
    buf.resize(head, 0);
    match fill(s, buf, req.offset, head + len).await {
        Ok(mut buf) => {
            match chunks {
                Some(to) => to.data_header(&mut buf, FLAG_DONE, req.offset, len),
                None => proto::simple_reply(&mut buf, 0, req.handle),
            }
            t.finish(buf);
        }
        Err(error) => t.finish_with(error),
    }
}

/// The extents of the READ's range, at most [`MAX_CHUNKS`] + 1; what they leave uncovered (and a
/// range whose holes cannot be found) is data.
fn allocation(s: &Session, req: &Request) -> Vec<Extent> {
    let len = req.length;
    let mut map = Vec::new();
    let (file, known) = (s.export.file(), &s.export.data_region);
    let covered = extents::walk(file, known, req.offset, len, MAX_CHUNKS, |e| map.push(e));
    let covered = match covered {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!("nbd: finding holes failed ({e}); reading the range as data");
            map.clear();
            0
        }
    };
    if covered < len {
        match map.last_mut() {
            Some(last) if !last.hole => last.len += len - covered,
            _ => map.push(Extent {
                len: len - covered,
                hole: false,
            }),
        }
    }
    map
}

/// A READ as data and hole chunks, one per extent of `map`, in order; the last is marked done.
async fn read_sparse(t: Ticket, req: Request, to: ReplyTo, map: &[Extent]) {
    let s = t.session();
    let size: usize = map
        .iter()
        .map(|e| {
            if e.hole {
                to.hole_len()
            } else {
                to.data_header_len() + e.len as usize
            }
        })
        .sum();
    let mut buf = s.take_buf(size);
    let mut at = req.offset;
    for (i, e) in map.iter().enumerate() {
        let flags = if i + 1 == map.len() { FLAG_DONE } else { 0 };
        if e.hole {
            // Within the request, whose length is a u32.
            to.hole(&mut buf, flags, at, e.len as u32);
        } else {
            let begin = buf.len();
            let (head, len) = (to.data_header_len(), e.len as usize);
            buf.resize(begin + head, 0);
            to.data_header(&mut buf[begin..], flags, at, len);
            buf = match fill(s, buf, at, begin + head + len).await {
                Ok(b) => b,
                Err(error) => return t.finish_with(error),
            };
        }
        at += e.len;
    }
    t.finish(buf);
}
