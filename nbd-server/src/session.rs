//! One connection's shared state in transmission: admission of requests (bounded in count,
//! bytes and queued replies), the tickets that guarantee each admitted request a reply,
//! buffer reuse, and the writer that sends replies in completion order.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use reactor::io::Slice;

use crate::budget::{Budget, Grant};
use crate::conn::Sock;
use crate::export::Export;
use crate::handshake::Negotiated;
use crate::proto::{self, REPLY_LEN, Request, cmd, err};
use crate::structured::{self, ReplyTo};

/// Requests of one connection admitted and not yet finished at once; the reader waits for a
/// slot beyond this.
pub const MAX_IN_FLIGHT: usize = 128;
/// Payload bytes (write data being written, read data not yet sent) of one connection in
/// flight at once; the reader waits beyond this unless nothing is in flight.
const MAX_BYTES_IN_FLIGHT: usize = 64 << 20;
/// Replies queued and not yet sent, beyond which the reader waits: a client that sends
/// requests without reading replies is throttled instead of filling memory.
const MAX_QUEUED_REPLIES: usize = 1024;
/// Buffers up to this capacity (reply headers) are pooled apart from data buffers.
const SMALL_BUF: usize = 64;
const SMALL_POOL: usize = 256;
/// Data buffers kept for reuse: the largest kept, and the most bytes kept per connection.
const POOL_MAX_CAPACITY: usize = (1 << 20) + REPLY_LEN;
const POOL_BYTES: usize = 4 << 20;
/// Replies are copied into one send up to this size; larger ones are sent as they are.
const BATCH_BYTES: usize = 256 * 1024;

/// What bounds a connection beyond its own caps: the server-wide memory budget, and how long
/// a client may leave its replies unread.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) budget: Arc<Budget>,
    /// A send that makes no progress for this long disconnects the client (`None`: never).
    pub(crate) idle: Option<Duration>,
    /// When the IoThread busy-polls.
    pub(crate) poll: crate::polling::Policy,
}

/// A reply ready to send: its bytes, the bytes it accounts for on the connection, and its
/// hold on the server's budget (given back once it is sent).
type Ready = (Vec<u8>, usize, Option<Grant>);

/// What one connection shares between its reader, its requests (served in the reader or as
/// tasks) and its writer.
pub(crate) struct Session {
    pub(crate) sock: Sock,
    pub(crate) export: Arc<Export>,
    pub(crate) negotiated: Negotiated,
    limits: Limits,
    /// Replies ready to send.
    outbox: RefCell<VecDeque<Ready>>,
    /// Requests admitted whose reply is not yet in the outbox.
    pending: Cell<usize>,
    /// Requests admitted whose reply is not yet sent: what the client has in flight, as far
    /// as the server can tell (its queue depth), for the polling policy.
    unsent: Cell<usize>,
    /// Bytes admitted and not yet sent: payloads, and every reply's header.
    bytes: Cell<usize>,
    /// The reader has stopped: the writer ends once everything admitted is sent.
    closing: Cell<bool>,
    /// A send to the client failed or timed out: replies are dropped from now on, no more
    /// requests are read, and requests not yet started are not started.
    broken: Cell<bool>,
    /// When the write in progress started (`None`: none is); the idle watchdog reads it.
    writing_since: Cell<Option<Instant>>,
    writer_waker: Cell<Option<Waker>>,
    reader_waker: Cell<Option<Waker>>,
    small: RefCell<Vec<Vec<u8>>>,
    large: RefCell<Vec<Vec<u8>>>,
    large_bytes: Cell<usize>,
    /// Aligned buffers for an `O_DIRECT` export's I/O.
    pub(crate) aligned: crate::direct::AlignedPool,
    /// Requests read, added to the export's counter when the connection ends.
    pub(crate) requests: Cell<u64>,
}

/// An admitted request's claim to a reply. [`finish`](Ticket::finish) queues the reply;
/// a ticket dropped unfinished (its request panicked or was dropped) answers `EIO`, so the
/// connection's count of requests in flight always returns to zero and it can close.
pub(crate) struct Ticket {
    s: Rc<Session>,
    handle: u64,
    /// Where the reply's chunks go when it must be made of chunks (see
    /// [`Session::reply_to`]), errors included; `None` for a simple reply.
    chunks: Option<ReplyTo>,
    bytes: usize,
    grant: Option<Grant>,
    done: bool,
}

impl Ticket {
    pub(crate) fn session(&self) -> &Session {
        &self.s
    }

    /// Queues `reply` (a header, and data for a READ).
    pub(crate) fn finish(mut self, reply: Vec<u8>) {
        self.done = true;
        self.s.complete(reply, self.bytes, self.grant.take());
    }

    /// Where the reply's chunks go, when it must be made of chunks.
    pub(crate) fn chunks(&self) -> Option<ReplyTo> {
        self.chunks
    }

    /// Queues a reply without data: `error` 0 for success.
    pub(crate) fn finish_with(self, error: u32) {
        let reply = self.s.header(error, self.handle, self.chunks);
        self.finish(reply);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            let reply = self.s.header(err::EIO, self.handle, self.chunks);
            self.s.complete(reply, self.bytes, self.grant.take());
        }
    }
}

fn wake(slot: &Cell<Option<Waker>>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

impl Session {
    pub(crate) fn new(
        sock: Sock,
        export: Arc<Export>,
        negotiated: Negotiated,
        limits: Limits,
    ) -> Session {
        Session {
            sock,
            export,
            negotiated,
            limits,
            outbox: RefCell::new(VecDeque::with_capacity(MAX_IN_FLIGHT)),
            pending: Cell::new(0),
            unsent: Cell::new(0),
            bytes: Cell::new(0),
            closing: Cell::new(false),
            broken: Cell::new(false),
            writing_since: Cell::new(None),
            writer_waker: Cell::new(None),
            reader_waker: Cell::new(None),
            small: RefCell::new(Vec::with_capacity(SMALL_POOL)),
            large: RefCell::new(Vec::new()),
            large_bytes: Cell::new(0),
            aligned: Default::default(),
            requests: Cell::new(0),
        }
    }

    /// An empty buffer with room for `capacity` bytes, reused when one is pooled.
    pub(crate) fn take_buf(&self, capacity: usize) -> Vec<u8> {
        let popped = if capacity <= SMALL_BUF {
            self.small.borrow_mut().pop()
        } else {
            let b = self.large.borrow_mut().pop();
            if let Some(b) = &b {
                self.large_bytes.set(self.large_bytes.get() - b.capacity());
            }
            b
        };
        let mut b = popped.unwrap_or_default();
        b.clear();
        b.reserve(capacity);
        b
    }

    /// Keeps `b` for reuse, within the pools' bounds.
    pub(crate) fn recycle(&self, b: Vec<u8>) {
        let cap = b.capacity();
        if cap <= SMALL_BUF {
            let mut small = self.small.borrow_mut();
            if small.len() < SMALL_POOL {
                small.push(b);
            }
        } else if cap <= POOL_MAX_CAPACITY && self.large_bytes.get() + cap <= POOL_BYTES {
            self.large_bytes.set(self.large_bytes.get() + cap);
            self.large.borrow_mut().push(b);
        }
    }

    /// Where the reply to `req` goes when it must be made of chunks: every reply with
    /// extended headers, READ and BLOCK_STATUS with structured replies; `None` for a simple
    /// reply.
    pub(crate) fn reply_to(&self, req: &Request) -> Option<ReplyTo> {
        let n = self.negotiated;
        let chunked =
            n.extended || n.structured && matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS);
        chunked.then_some(ReplyTo {
            handle: req.handle,
            offset: req.offset,
            extended: n.extended,
        })
    }

    /// A reply without data in a pooled buffer: a simple reply, or with `chunks` an error
    /// chunk (a final `NONE` chunk for success).
    pub(crate) fn header(&self, error: u32, handle: u64, chunks: Option<ReplyTo>) -> Vec<u8> {
        let mut b = self.take_buf(structured::EXTENDED_HEADER_LEN + 6);
        match (chunks, error) {
            (None, _) => {
                b.resize(REPLY_LEN, 0);
                proto::simple_reply(&mut b, error, handle);
            }
            (Some(to), 0) => {
                b.resize(to.header_len(), 0);
                to.header(&mut b, structured::FLAG_DONE, structured::kind::NONE, 0);
            }
            (Some(to), _) => {
                b.resize(to.error_len(), 0);
                to.error(&mut b, error);
            }
        }
        if error != 0 {
            // Relaxed: a statistics counter.
            self.export.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        b
    }

    /// Queues a reply to `req` that needs no task (an error found while parsing, an empty
    /// request).
    pub(crate) fn reply_now(&self, req: &Request, error: u32) {
        let b = self.header(error, req.handle, self.reply_to(req));
        self.bytes.set(self.bytes.get() + REPLY_LEN);
        self.unsent.set(self.unsent.get() + 1);
        self.outbox.borrow_mut().push_back((b, REPLY_LEN, None));
        wake(&self.writer_waker);
    }

    /// Waits until a request with `bytes` of payload fits the limits: requests in flight,
    /// bytes in flight (always met when nothing is in flight, so any request can proceed),
    /// replies queued. Returns at once when the connection is broken.
    pub(crate) async fn room(&self, bytes: usize) {
        poll_fn(|cx| {
            let full = !self.broken.get()
                && (self.pending.get() >= MAX_IN_FLIGHT
                    || (self.bytes.get() + bytes > MAX_BYTES_IN_FLIGHT && self.bytes.get() > 0)
                    || self.outbox.borrow().len() >= MAX_QUEUED_REPLIES);
            if full {
                self.reader_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
    }

    /// Whether the client is gone or has stopped taking replies: nothing more is read, and a
    /// request not yet started is not started.
    pub(crate) fn broken(&self) -> bool {
        self.broken.get()
    }

    /// Admits `req` with `bytes` of payload: waits for room on the connection, then for the
    /// payload's share of the server's budget, and counts it.
    pub(crate) async fn admit(self: &Rc<Self>, req: &Request, bytes: usize) -> Ticket {
        self.room(bytes).await;
        // A broken connection's request is never run: it takes none of the budget.
        let grant = if bytes > 0 && !self.broken.get() {
            Some(self.limits.budget.acquire(bytes).await)
        } else {
            None
        };
        self.pending.set(self.pending.get() + 1);
        self.unsent.set(self.unsent.get() + 1);
        // The depth that counts is the client's: a request served at once (a READ from the
        // page cache) leaves `pending` at once, but the client waits for it until it is sent.
        (self.limits.poll).admitted(self.unsent.get(), &self.export.stats.polling_pauses);
        let bytes = bytes + REPLY_LEN;
        self.bytes.set(self.bytes.get() + bytes);
        Ticket {
            s: self.clone(),
            handle: req.handle,
            chunks: self.reply_to(req),
            bytes,
            grant,
            done: false,
        }
    }

    fn complete(&self, reply: Vec<u8>, bytes: usize, grant: Option<Grant>) {
        self.pending.set(self.pending.get() - 1);
        self.outbox.borrow_mut().push_back((reply, bytes, grant));
        wake(&self.writer_waker);
    }

    /// `fdatasync` of the export, counted.
    pub(crate) async fn sync(&self) -> io::Result<()> {
        // Relaxed: a statistics counter.
        self.export.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.export.file().fdatasync().await
    }

    /// The reader has stopped: the writer ends after the last admitted reply.
    pub(crate) fn close(&self) {
        self.closing.set(true);
        wake(&self.writer_waker);
    }

    /// Sends `buf`; a failure marks the connection broken (as does the idle watchdog, for a
    /// write that makes no progress). Gives the buffer back, empty.
    async fn send(&self, buf: Vec<u8>) -> Vec<u8> {
        let mut buf = buf;
        let mut done = 0;
        while done < buf.len() && !self.broken.get() {
            let end = buf.len();
            if self.limits.idle.is_some() {
                // (Read by the idle watchdog only: no clock read without one.)
                self.writing_since.set(Some(Instant::now()));
            }
            let (res, slice) = self.sock.write(Slice::range(buf, done, end)).await;
            self.writing_since.set(None);
            buf = slice.into_inner();
            match res {
                Ok(0) => {
                    tracing::debug!("nbd: sending replies failed: the socket took nothing");
                    self.mark_broken();
                }
                Ok(n) => done += n,
                Err(e) => {
                    tracing::debug!("nbd: sending replies failed: {e}");
                    self.mark_broken();
                }
            }
        }
        buf.clear();
        buf
    }

    /// Watches the writer: a write that makes no progress for the idle limit (the client
    /// reads nothing while replies wait) disconnects the client, so that the write fails and
    /// what the connection holds is given back. One timer per connection, not one per send.
    pub(crate) async fn idle_watchdog(self: Rc<Self>) {
        let Some(limit) = self.limits.idle else {
            return;
        };
        let tick = (limit / 4).max(Duration::from_millis(10));
        while !self.broken.get() {
            reactor::time::sleep(tick).await;
            if self
                .writing_since
                .get()
                .is_some_and(|t| t.elapsed() >= limit)
            {
                tracing::info!("nbd: the client read no reply for {limit:?}; disconnecting it");
                self.mark_broken();
            }
        }
    }

    /// The client is gone or stalled: stop reading from it, drop its replies, and wake the
    /// reader (waiting for room) so that it sees this and ends the connection.
    fn mark_broken(&self) {
        if !self.broken.replace(true) {
            self.sock.shutdown();
            wake(&self.reader_waker);
        }
    }
}

/// Sends replies until the reader has stopped and every admitted request has replied.
/// Replies that are ready together go out in one send (small ones copied into one buffer,
/// large ones on their own, order kept).
pub(crate) async fn writer(s: Rc<Session>) {
    let mut queue = VecDeque::with_capacity(MAX_IN_FLIGHT);
    // Made on the first batch: a connection that never has two replies ready together (an
    // idle one, a QD1 client) never holds the 256 KiB. (Allocated with every connection, a
    // burst of thousands of them left the heap fragmented after they closed: each round
    // carved these buffers out of the free memory the last one left, and the heap grew by
    // about 19 KB per connection per round.)
    let mut batch: Vec<u8> = Vec::new();
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
        let (mut sent_bytes, replies) = (0, queue.len());
        // Grants are given back once what they account for is sent (or dropped).
        while let Some((reply, bytes, _grant)) = queue.pop_front() {
            sent_bytes += bytes;
            if s.broken.get() {
                s.recycle(reply);
                continue;
            }
            if reply.len() >= BATCH_BYTES || (batch.is_empty() && queue.is_empty()) {
                if !batch.is_empty() {
                    batch = s.send(batch).await;
                }
                let reply = s.send(reply).await;
                s.recycle(reply);
                continue;
            }
            if batch.capacity() == 0 {
                batch.reserve_exact(BATCH_BYTES);
            }
            batch.extend_from_slice(&reply);
            s.recycle(reply);
            if batch.len() >= BATCH_BYTES || queue.is_empty() {
                batch = s.send(batch).await;
            }
        }
        batch.clear();
        s.bytes.set(s.bytes.get() - sent_bytes);
        s.unsent.set(s.unsent.get() - replies);
        wake(&s.reader_waker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_backends as backends;
    use reactor::Reactor;

    fn test_limits() -> Limits {
        Limits {
            budget: Budget::new(crate::budget::DEFAULT_MAX_MEMORY),
            idle: None,
            poll: crate::polling::Policy {
                params: reactor::PollParams::OFF,
                depth: 0,
            },
        }
    }

    #[test]
    fn a_ticket_dropped_unfinished_answers_eio_and_the_connection_still_ends() {
        for backend in backends() {
            let r = Reactor::builder().backend(backend).build().unwrap();
            let path =
                std::env::temp_dir().join(format!("ticket-{backend}-{}", std::process::id()));
            std::fs::write(&path, [0u8; 4096]).unwrap();
            let export = Export::open(&path, "", "", false).unwrap();
            r.block_on(async {
                let (a, b) = reactor::net::UnixStream::pair().unwrap();
                let s = Rc::new(Session::new(
                    Sock::unix(a),
                    export,
                    Negotiated::default(),
                    test_limits(),
                ));
                let w = Reactor::with_current(|r| r.spawn_local(writer(s.clone()))).unwrap();
                let req = |handle| Request {
                    flags: 0,
                    kind: cmd::READ,
                    handle,
                    offset: 0,
                    length: 4096,
                };
                let dropped = s.admit(&req(42), 4096).await;
                let finished = s.admit(&req(43), 0).await;
                assert_eq!(s.unsent.get(), 2, "the client's depth");
                finished.finish_with(0);
                assert_eq!(
                    (s.pending.get(), s.unsent.get()),
                    (1, 2),
                    "finished, not sent"
                );
                drop(dropped); // as when its task panics or is dropped
                s.close();
                // The writer ends: nothing is left in flight.
                w.await.unwrap();
                assert_eq!(
                    (s.pending.get(), s.unsent.get(), s.bytes.get()),
                    (0, 0, 0),
                    "every byte accounted for"
                );
                let (res, got) = b.read(Vec::with_capacity(64)).await;
                assert_eq!(res.unwrap(), 32, "two replies");
                assert_eq!(&got[4..16], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 43]);
                assert_eq!(&got[20..32], &[0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 42], "EIO");
            });
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn pools_are_bounded_and_sorted_by_size() {
        let r = Reactor::new().unwrap();
        let path = std::env::temp_dir().join(format!("pools-{}", std::process::id()));
        std::fs::write(&path, [0u8; 16]).unwrap();
        let export = Export::open(&path, "", "", false).unwrap();
        r.block_on(async {
            let (a, _b) = reactor::net::UnixStream::pair().unwrap();
            let s = Session::new(Sock::unix(a), export, Negotiated::default(), test_limits());
            for _ in 0..100 {
                s.recycle(Vec::with_capacity(1 << 20));
                s.recycle(Vec::with_capacity(16));
            }
            assert!(s.large_bytes.get() <= POOL_BYTES);
            assert_eq!(s.large.borrow().len(), 4, "4 MiB of 1 MiB buffers");
            assert_eq!(s.small.borrow().len(), 100);
            assert!(
                s.take_buf(16).capacity() < 1 << 20,
                "a header never takes a data buffer"
            );
            s.recycle(Vec::with_capacity(32 << 20));
            assert_eq!(s.large.borrow().len(), 4, "huge buffers are not kept");
        });
        std::fs::remove_file(path).unwrap();
    }
}
