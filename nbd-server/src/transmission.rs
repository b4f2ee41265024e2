//! The transmission phase: requests are read in order, served concurrently (a task each,
//! many in flight), and their replies written in completion order, batched into one write
//! when several are ready.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};

use reactor::Reactor;
use reactor::io::Slice;

use crate::conn::{Reader, Sock};
use crate::export::Export;
use crate::proto::{self, REPLY_LEN, Request, cflag, cmd, err};
use crate::stop::Stop;

/// Requests of one connection in flight at once; the reader waits for a slot beyond this.
pub const MAX_IN_FLIGHT: usize = 128;
/// Payload bytes (write data being written, read data not yet sent) of one connection in
/// flight at once; the reader waits beyond this unless nothing is in flight.
const MAX_BYTES_IN_FLIGHT: usize = 64 << 20;
/// Replies queued and not yet sent, beyond which the reader waits: a client that sends
/// requests without reading replies is throttled instead of filling memory.
const MAX_QUEUED_REPLIES: usize = 1024;
/// Reply buffers kept for reuse per connection, and the largest kept.
const POOL_BUFFERS: usize = 64;
const POOL_MAX_CAPACITY: usize = 1 << 20;
/// Replies are copied into one write up to this size; larger ones are written on their own.
const BATCH_BYTES: usize = 256 * 1024;

/// What one connection shares between its reader, its request tasks and its writer.
struct Session {
    sock: Sock,
    export: Arc<Export>,
    /// Replies ready to send, each with the payload bytes it accounts for.
    outbox: RefCell<VecDeque<(Vec<u8>, usize)>>,
    /// Requests admitted whose reply is not yet in the outbox.
    pending: Cell<usize>,
    /// Payload bytes admitted and not yet sent (each reply also counts its header).
    bytes: Cell<usize>,
    /// The reader has stopped: the writer ends once everything admitted is sent.
    closing: Cell<bool>,
    /// A write to the client failed: replies are dropped from now on.
    broken: Cell<bool>,
    writer_waker: Cell<Option<Waker>>,
    reader_waker: Cell<Option<Waker>>,
    pool: RefCell<Vec<Vec<u8>>>,
    requests: Cell<u64>,
}

impl Session {
    fn wake(slot: &Cell<Option<Waker>>) {
        if let Some(w) = slot.take() {
            w.wake();
        }
    }

    fn take_buf(&self, capacity: usize) -> Vec<u8> {
        let mut b = self.pool.borrow_mut().pop().unwrap_or_default();
        b.clear();
        b.reserve(capacity);
        b
    }

    fn recycle(&self, b: Vec<u8>) {
        let mut pool = self.pool.borrow_mut();
        if pool.len() < POOL_BUFFERS && b.capacity() <= POOL_MAX_CAPACITY + REPLY_LEN {
            pool.push(b);
        }
    }

    fn header(&self, error: u32, handle: u64) -> Vec<u8> {
        let mut b = self.take_buf(REPLY_LEN);
        b.resize(REPLY_LEN, 0);
        proto::simple_reply(&mut b, error, handle);
        if error != 0 {
            // Relaxed: a statistics counter.
            self.export.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        b
    }

    /// Queues a reply that needs no task (an error found while parsing, an empty request).
    fn reply_now(&self, error: u32, handle: u64) {
        let b = self.header(error, handle);
        self.bytes.set(self.bytes.get() + REPLY_LEN);
        self.outbox.borrow_mut().push_back((b, REPLY_LEN));
        Self::wake(&self.writer_waker);
    }

    /// Waits until a request with `bytes` of payload fits the limits: requests in flight,
    /// bytes in flight (always met when nothing is in flight, so any request can proceed),
    /// replies queued.
    async fn room(&self, bytes: usize) {
        poll_fn(|cx| {
            let full = self.pending.get() >= MAX_IN_FLIGHT
                || (self.bytes.get() + bytes > MAX_BYTES_IN_FLIGHT && self.bytes.get() > 0)
                || self.outbox.borrow().len() >= MAX_QUEUED_REPLIES;
            if full {
                self.reader_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
    }

    /// Admits a request that a task will serve: waits for room, then counts it.
    async fn admit(&self, bytes: usize) {
        self.room(bytes).await;
        self.pending.set(self.pending.get() + 1);
        self.bytes.set(self.bytes.get() + bytes + REPLY_LEN);
    }

    /// Releases an admitted request that will not be served.
    fn release(&self, bytes: usize) {
        self.pending.set(self.pending.get() - 1);
        self.bytes.set(self.bytes.get() - bytes - REPLY_LEN);
    }

    /// A task's reply (for a request admitted with `bytes`) is ready.
    fn complete(&self, reply: Vec<u8>, bytes: usize) {
        self.pending.set(self.pending.get() - 1);
        self.outbox
            .borrow_mut()
            .push_back((reply, bytes + REPLY_LEN));
        Self::wake(&self.writer_waker);
    }

    async fn sync(&self) -> io::Result<()> {
        // Relaxed: a statistics counter.
        self.export.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.export.file().fdatasync().await
    }
}

/// Serves requests on `sock` until the client disconnects (`NBD_CMD_DISC` or end of stream),
/// then finishes every request in flight and sends its reply before returning.
///
/// # Errors
/// A protocol violation that ends the connection (bad request magic, an oversized WRITE) or
/// a socket error; the requests already admitted are finished first either way.
pub(crate) async fn serve(sock: Sock, rd: Reader, export: Arc<Export>) -> io::Result<()> {
    // Relaxed: a statistics counter.
    export.stats.connections.fetch_add(1, Ordering::Relaxed);
    let s = Rc::new(Session {
        sock,
        export,
        outbox: RefCell::new(VecDeque::with_capacity(MAX_IN_FLIGHT)),
        pending: Cell::new(0),
        bytes: Cell::new(0),
        closing: Cell::new(false),
        broken: Cell::new(false),
        writer_waker: Cell::new(None),
        reader_waker: Cell::new(None),
        pool: RefCell::new(Vec::with_capacity(POOL_BUFFERS)),
        requests: Cell::new(0),
    });
    let writer = spawn(writer(s.clone()));
    let res = read_requests(&s, rd).await;
    s.closing.set(true);
    Session::wake(&s.writer_waker);
    // The writer ends when every admitted request has replied and the replies are sent.
    let _ = writer.await;
    // Counted before the close, so a client that saw the close sees the count.
    // Relaxed: a statistics counter.
    s.export
        .stats
        .requests
        .fetch_add(s.requests.get(), Ordering::Relaxed);
    s.sock.shutdown();
    match res {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        other => other,
    }
}

fn spawn<F: Future + 'static>(f: F) -> reactor::JoinHandle<F::Output> {
    Reactor::with_current(|r| r.spawn_local(f)).expect("connections run inside a reactor")
}

/// Whether `offset + length` lies inside the export.
fn in_bounds(export: &Export, req: &Request) -> bool {
    req.offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= export.size())
}

async fn read_requests(s: &Rc<Session>, mut rd: Reader) -> io::Result<()> {
    let sock = &s.sock;
    let stop = Stop::current();
    loop {
        // Between requests, a server shutdown ends the connection like a DISC: what is in
        // flight is finished and answered, nothing more is read.
        let next = stop
            .unless_stopped(async {
                s.room(0).await;
                rd.read_array::<{ proto::REQUEST_LEN }>(sock).await
            })
            .await;
        let Some(header) = next else {
            tracing::debug!("nbd: server shutting down; closing after the requests in flight");
            return Ok(());
        };
        let req = Request::parse(&header?)?;
        s.requests.set(s.requests.get() + 1);
        let ro = s.export.read_only();
        let len = req.length as usize;
        match req.kind {
            cmd::DISC => return Ok(()),
            cmd::WRITE => {
                if req.length > proto::MAX_PAYLOAD {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("WRITE of {} bytes exceeds the 32 MiB maximum", req.length),
                    ));
                }
                let refuse = if req.flags & !cflag::FUA != 0 {
                    err::EINVAL
                } else if ro {
                    err::EPERM
                } else if !in_bounds(&s.export, &req) {
                    err::ENOSPC
                } else {
                    0
                };
                if refuse != 0 || len == 0 {
                    rd.skip(sock, u64::from(req.length)).await?;
                    s.reply_now(refuse, req.handle);
                    continue;
                }
                s.admit(len).await;
                let payload = rd.read_into(sock, s.take_buf(len), len).await;
                let payload = match payload {
                    Ok(p) => p,
                    Err(e) => {
                        // Admitted but never started: release it, then end the connection.
                        s.release(len);
                        return Err(e);
                    }
                };
                spawn(write(s.clone(), req, payload)).detach();
            }
            cmd::READ => {
                let refuse = if req.flags & !cflag::FUA != 0
                    || req.length > proto::MAX_PAYLOAD
                    || !in_bounds(&s.export, &req)
                {
                    err::EINVAL
                } else {
                    0
                };
                if refuse != 0 || len == 0 {
                    s.reply_now(refuse, req.handle);
                    continue;
                }
                s.admit(len).await;
                spawn(read(s.clone(), req)).detach();
            }
            cmd::FLUSH => {
                if req.flags & !cflag::FUA != 0 {
                    s.reply_now(err::EINVAL, req.handle);
                    continue;
                }
                s.admit(0).await;
                spawn(flush(s.clone(), req)).detach();
            }
            cmd::TRIM | cmd::WRITE_ZEROES => {
                let allowed = if req.kind == cmd::TRIM {
                    cflag::FUA
                } else {
                    cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO
                };
                let past_end = if req.kind == cmd::TRIM {
                    err::EINVAL
                } else {
                    err::ENOSPC
                };
                let refuse = if req.flags & !allowed != 0 {
                    err::EINVAL
                } else if ro {
                    err::EPERM
                } else if !in_bounds(&s.export, &req) {
                    past_end
                } else {
                    0
                };
                if refuse != 0 || len == 0 {
                    s.reply_now(refuse, req.handle);
                    continue;
                }
                s.admit(0).await;
                spawn(discard_or_zero(s.clone(), req)).detach();
            }
            _ => s.reply_now(err::EINVAL, req.handle),
        }
    }
}

/// Sends replies until the reader has stopped and every admitted request has replied.
async fn writer(s: Rc<Session>) {
    let mut queue = VecDeque::with_capacity(MAX_IN_FLIGHT);
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
    loop {
        poll_fn(|cx| {
            let done = s.closing.get() && s.pending.get() == 0;
            if !s.outbox.borrow().is_empty() || done {
                Poll::Ready(())
            } else {
                s.writer_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        std::mem::swap(&mut queue, &mut *s.outbox.borrow_mut());
        if queue.is_empty() {
            return;
        }
        let mut sent_bytes = 0;
        while let Some((reply, bytes)) = queue.pop_front() {
            sent_bytes += bytes;
            if s.broken.get() {
                s.recycle(reply);
                continue;
            }
            if batch.is_empty() && (queue.is_empty() || reply.len() >= BATCH_BYTES) {
                // Alone or large: send it as it is.
                let (res, reply) = s.sock.write_all(reply).await;
                s.recycle(reply);
                if let Err(e) = res {
                    tracing::debug!("nbd: writing a reply failed: {e}");
                    s.broken.set(true);
                }
                continue;
            }
            batch.extend_from_slice(&reply);
            s.recycle(reply);
            if batch.len() >= BATCH_BYTES || queue.is_empty() {
                let (res, b) = s.sock.write_all(std::mem::take(&mut batch)).await;
                batch = b;
                batch.clear();
                if let Err(e) = res {
                    tracing::debug!("nbd: writing replies failed: {e}");
                    s.broken.set(true);
                }
            }
        }
        s.bytes.set(s.bytes.get() - sent_bytes);
        Session::wake(&s.reader_waker);
    }
}

async fn read(s: Rc<Session>, req: Request) {
    let len = req.length as usize;
    let end = REPLY_LEN + len;
    let mut buf = s.take_buf(end);
    buf.resize(REPLY_LEN, 0);
    let mut error = 0;
    while buf.len() < end {
        let done = buf.len() - REPLY_LEN;
        let at = req.offset + done as u64;
        let (res, b) = s
            .export
            .file()
            .read_at(Slice::range(buf, REPLY_LEN + done, end), at)
            .await;
        buf = b.into_inner();
        match res {
            Ok(0) => {
                // The file shrank under the export.
                error = err::EIO;
                break;
            }
            Ok(_) => {}
            Err(e) => {
                error = proto::errno(&e);
                break;
            }
        }
    }
    if error != 0 {
        // An error reply carries no data.
        buf.truncate(REPLY_LEN);
        // Relaxed: a statistics counter.
        s.export.stats.errors.fetch_add(1, Ordering::Relaxed);
    }
    proto::simple_reply(&mut buf, error, req.handle);
    s.complete(buf, len);
}

async fn write(s: Rc<Session>, req: Request, payload: Vec<u8>) {
    let len = payload.len();
    let (res, payload) = s.export.file().write_all_at(payload, req.offset).await;
    s.recycle(payload);
    let mut error = res.err().map_or(0, |e| proto::errno(&e));
    if error == 0 && req.flags & cflag::FUA != 0 {
        error = s.sync().await.err().map_or(0, |e| proto::errno(&e));
    }
    let reply = s.header(error, req.handle);
    s.complete(reply, len);
}

async fn flush(s: Rc<Session>, req: Request) {
    let error = s.sync().await.err().map_or(0, |e| proto::errno(&e));
    let reply = s.header(error, req.handle);
    s.complete(reply, 0);
}

/// TRIM punches a hole (a hint: a file system that cannot is not an error); WRITE_ZEROES
/// punches a hole or, with NO_HOLE, zeroes the range allocated, falling back to writing
/// zeros unless FAST_ZERO asks for a quick failure instead.
async fn discard_or_zero(s: Rc<Session>, req: Request) {
    let file = s.export.file();
    let (offset, len) = (req.offset, u64::from(req.length));
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    let mut result = Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    let modes: &[i32] = match (req.kind, req.flags & cflag::NO_HOLE != 0) {
        (cmd::TRIM, _) => &[punch],
        (_, false) => &[punch, zero],
        (_, true) => &[zero],
    };
    for &mode in modes {
        result = file.fallocate(mode, offset, len).await;
        if !is_unsupported(&result) {
            break;
        }
    }
    if is_unsupported(&result) {
        result = if req.kind == cmd::TRIM {
            Ok(())
        } else if req.flags & cflag::FAST_ZERO != 0 {
            Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        } else {
            write_zeros(&s, offset, len).await
        };
    }
    let mut error = result.err().map_or(0, |e| proto::errno(&e));
    if error == 0 && req.flags & cflag::FUA != 0 {
        error = s.sync().await.err().map_or(0, |e| proto::errno(&e));
    }
    let reply = s.header(error, req.handle);
    s.complete(reply, 0);
}

fn is_unsupported(r: &io::Result<()>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP))
}

async fn write_zeros(s: &Session, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let mut zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        zeros.truncate(n);
        let (res, z) = s.export.file().write_all_at(zeros, offset + done).await;
        zeros = z;
        res?;
        done += n as u64;
    }
    Ok(())
}
