//! The transmission phase: requests are read in order and checked here, then served
//! concurrently (a task each, many in flight, see [`crate::commands`]), their replies sent
//! by the session's writer in completion order.

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use reactor::Reactor;

use crate::commands;
use crate::conn::{Reader, Sock};
use crate::export::Export;
use crate::proto::{self, Request, cflag, cmd, err};
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
    limits: Limits,
) -> io::Result<()> {
    // Relaxed: a statistics counter.
    export.stats.connections.fetch_add(1, Ordering::Relaxed);
    let s = Rc::new(Session::new(sock, export, limits));
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
        if s.broken() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client stopped taking replies; its remaining requests are dropped",
            ));
        }
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
                let ticket = s.admit(req.handle, len).await;
                // (On an error the ticket is dropped: an EIO reply nobody will read.)
                let payload = rd.read_into(sock, s.take_buf(len), len).await?;
                spawn(commands::write(ticket, req, payload)).detach();
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
                let ticket = s.admit(req.handle, len).await;
                spawn(commands::read(ticket, req)).detach();
            }
            cmd::FLUSH => {
                if req.flags & !cflag::FUA != 0 {
                    s.reply_now(err::EINVAL, req.handle);
                    continue;
                }
                let ticket = s.admit(req.handle, 0).await;
                spawn(commands::flush(ticket)).detach();
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
                let ticket = s.admit(req.handle, 0).await;
                spawn(commands::discard_or_zero(ticket, req)).detach();
            }
            _ => s.reply_now(err::EINVAL, req.handle),
        }
    }
}
