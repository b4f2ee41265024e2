//! The transmission phase: requests are read in order here, judged by their command's rule
//! (`rules.rs`), then served concurrently (each rule's handler, in `commands.rs` and
//! `read.rs`): each is first run in the reader's own task, and
//! one that has to wait goes on as a task of its own, many in flight. Their replies are sent
//! by the session's writer in completion order.

use std::future::poll_fn;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use reactor::Reactor;

use crate::conn::{Reader, Sock};
use crate::export::Export;
use crate::handshake::Negotiated;
use crate::proto::{self, Request, cflag, cmd, err};
use crate::rules::{self, Verdict, Work};
use crate::session::{Limits, Session, writer};
use crate::stop::Stop;

pub use crate::session::MAX_IN_FLIGHT;

/// Serves requests on `sock` until the client disconnects (`NBD_CMD_DISC` or end of stream)
/// or the server shuts down, then finishes every request in flight and sends its reply
/// before returning. Once the client is gone or stops taking replies (a send fails, or makes
/// no progress for the idle limit), nothing more is read, requests not yet started are
/// dropped, and a READ in flight stops at its next chunk: a vanished client costs at most the
/// I/O already running.
///
/// # Errors
/// A protocol violation that ends the connection (bad request magic, an oversized WRITE) or
/// a socket error; the requests already admitted are finished first either way.
pub(crate) async fn serve(
    sock: Sock,
    rd: Reader,
    export: Arc<Export>,
    negotiated: Negotiated,
    limits: Limits,
) -> io::Result<()> {
    // Relaxed: a statistics counter.
    export.stats.connections.fetch_add(1, Ordering::Relaxed);
    let s = Rc::new(Session::new(sock, export, negotiated, limits));
    let writer = spawn(writer(s.clone()));
    let watchdog = spawn(s.clone().idle_watchdog());
    let res = read_requests(&s, rd).await;
    s.close();
    // The writer ends when every admitted request has replied and the replies are sent.
    let _ = writer.await;
    watchdog.abort();
    // Counted before the close, so a client that saw the close sees the count.
    // Relaxed: a statistics counter.
    s.export
        .stats
        .requests
        .fetch_add(s.requests.get(), Ordering::Relaxed);
    if !s.broken() {
        // TLS's close_notify, bounded: a client that reads nothing more cannot hold it.
        let _ = reactor::time::timeout(CLOSE_LIMIT, s.sock.close()).await;
    }
    s.sock.shutdown();
    match res {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        other => other,
    }
}

/// How long the close of a connection may wait to send TLS's `close_notify`.
const CLOSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

fn spawn<F: Future + 'static>(f: F) -> reactor::JoinHandle<F::Output> {
    Reactor::with_current(|r| r.spawn_local(f)).expect("connections run inside a reactor")
}

/// Requests the reader serves before it yields to the loop once, whatever they cost: what
/// one client's burst can hold its IoThread for is at most this many requests' work.
const READER_TURN: u64 = 32;

/// Serves one admitted request: its future is polled once here, in the reader's task, and
/// becomes a task of its own only if it has to wait. A READ the page cache serves, or a
/// WRITE made inline, is done within that poll, without a task's allocations, its schedule
/// and its separate poll. Their file operations count against the reader's I/O budget, so a
/// client with many such requests still lets the loop run others: once the budget is spent,
/// the next request yields at its first operation and goes on as a task (and counts as one
/// that waited). The reader also yields every [`READER_TURN`] requests, for work that spends
/// no budget.
///
/// A panic in a request's code ends that request only, as it would in a task of its own: its
/// ticket, dropped, answers EIO.
async fn serve_request(s: &Session, mut f: Work) {
    let waits = poll_fn(|cx| {
        // The leaf futures store the waker of each poll, so once the request is a task,
        // its first poll there replaces the reader's waker with the task's.
        let polled = catch_unwind(AssertUnwindSafe(|| f.as_mut().poll(cx)));
        Poll::Ready(matches!(polled, Ok(Poll::Pending)))
    })
    .await;
    if waits {
        // Relaxed: a statistics counter.
        s.export
            .stats
            .requests_waited
            .fetch_add(1, Ordering::Relaxed);
        spawn(f).detach();
    }
}

/// Reads the next request header: `None` once the server shuts down (between requests, that
/// ends the connection like a DISC: what is in flight is finished and answered, nothing more
/// is read).
///
/// # Errors
/// The client stopped taking replies; the socket's error; a bad header.
async fn next_request(s: &Session, rd: &mut Reader, stop: &Stop) -> io::Result<Option<Request>> {
    let sock = &s.sock;
    let extended = s.negotiated.extended;
    let next = stop
        .unless_stopped(async {
            s.room(0).await;
            if extended {
                let h = rd
                    .read_array::<{ proto::EXTENDED_REQUEST_LEN }>(sock)
                    .await?;
                Request::parse_extended(&h)
            } else {
                Request::parse(&rd.read_array::<{ proto::REQUEST_LEN }>(sock).await?)
            }
        })
        .await;
    let Some(req) = next else {
        tracing::debug!("nbd: server shutting down; closing after the requests in flight");
        return Ok(None);
    };
    if s.broken() {
        return Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the client stopped taking replies; its remaining requests are dropped",
        ));
    }
    let req = req?;
    s.requests.set(s.requests.get() + 1);
    if s.requests.get() % READER_TURN == 0 {
        // Requests served here may do work that spends no I/O budget (BLOCK_STATUS's
        // `lseek`s): the loop gets a turn anyway.
        reactor::yield_now().await;
    }
    Ok(Some(req))
}

/// The reader: each request read in order, judged by its command's rule, and either answered
/// at once or admitted and served.
async fn read_requests(s: &Rc<Session>, mut rd: Reader) -> io::Result<()> {
    let sock = &s.sock;
    let stop = Stop::current();
    loop {
        let Some(req) = next_request(s, &mut rd, &stop).await? else {
            return Ok(());
        };
        // A payload follows a WRITE (whose length is always the payload's: QEMU's client
        // does not flag it), and with extended headers any request flagged PAYLOAD_LEN.
        let flagged = s.negotiated.extended && req.flags & cflag::PAYLOAD_LEN != 0;
        let payload = req.kind == cmd::WRITE || flagged;
        if payload && req.length > u64::from(proto::MAX_PAYLOAD) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a payload of {} bytes exceeds the 32 MiB maximum",
                    req.length
                ),
            ));
        }
        if payload && req.kind != cmd::WRITE {
            // A payload where none belongs: read past, then refused.
            rd.skip(sock, req.length).await?;
            s.reply_now(&req, err::EINVAL);
            continue;
        }
        if req.kind == cmd::DISC {
            return Ok(());
        }
        let Some(rule) = rules::of(req.kind) else {
            s.reply_now(&req, err::EINVAL);
            continue;
        };
        let ex = &s.export;
        match rule.judge(&req, &s.negotiated, ex.size(), ex.read_only()) {
            Verdict::Reply(error) => {
                if rule.payload {
                    rd.skip(sock, req.length).await?;
                }
                s.reply_now(&req, error);
            }
            Verdict::Serve { holds } => {
                let ticket = s.admit(&req, holds).await;
                // (On an error reading the payload the ticket is dropped: an EIO reply
                // nobody will read.)
                let payload = if rule.payload {
                    // At most MAX_PAYLOAD (checked above).
                    let len = req.length as usize;
                    rd.read_into(sock, s.take_buf(len), len).await?
                } else {
                    Vec::new()
                };
                serve_request(s, rule.work(ticket, req, payload)).await;
            }
        }
    }
}
