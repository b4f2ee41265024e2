//! The accept side: listeners on the accept thread hand connections to the IoThreads, round
//! robin, within the connection limit; each connection then runs from the greeting to the
//! close (`connection`).

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Poll, Waker};
use std::time::Duration;

use reactor::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::activation::Listener;
use crate::conn::{Reader, Sock};
use crate::export::Export;
use crate::handshake::{self, Outcome};
use crate::log::RateLimit;
use crate::memory::{self, Connections};
use crate::session::Limits;
use crate::stop::{Live, Stop};
use crate::tls::Tls;
use crate::transmission;

/// Hands accepted connections to the IoThreads, round robin.
pub(crate) struct Dispatch {
    pub(crate) export: Arc<Export>,
    pub(crate) workers: Vec<reactor::Handle>,
    pub(crate) next: AtomicUsize,
    pub(crate) limit: Option<Duration>,
    pub(crate) live: Arc<Live>,
    pub(crate) limits: Limits,
    /// TLS credentials and policy (`None`: `--tls off`).
    pub(crate) tls: Option<Arc<Tls>>,
    pub(crate) max_connections: usize,
    /// Connections being served (from dispatch to close), and their peak.
    pub(crate) conns: Arc<Connections>,
    /// Told when a connection closes: an accept loop backing off after running out of fds
    /// resumes at once.
    pub(crate) freed: Freed,
}

/// Refused connections (over `max_connections`): logged at most once a second.
static REFUSED: RateLimit = RateLimit::new(Duration::from_secs(1));
/// Accept failures: logged at most once every 5 s (a full fd table can last).
static ACCEPT_FAILED: RateLimit = RateLimit::new(Duration::from_secs(5));

/// A connection-count slot; given back (and the accept loop told) when dropped.
struct Slot(Arc<Dispatch>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.conns.leave();
        self.0.freed.notify();
    }
}

impl Dispatch {
    /// Takes a connection slot, or `None` when `max_connections` are served.
    fn slot(self: &Arc<Self>) -> Option<Slot> {
        if self.conns.enter(self.max_connections).is_none() {
            REFUSED.log(|suppressed| {
                tracing::warn!(
                    max = self.max_connections,
                    suppressed,
                    "nbd: connection refused: the server is at --max-connections"
                )
            });
            return None;
        }
        Some(Slot(self.clone()))
    }

    /// Sends `sock` (a `std` socket: it crosses threads) to the next IoThread, where `wrap`
    /// registers it with that thread's reactor and the connection task starts. Over
    /// `max_connections`, `sock` is closed at once instead.
    fn dispatch<S: Send + 'static>(self: &Arc<Self>, sock: S, wrap: fn(S) -> io::Result<Sock>) {
        let Some(slot) = self.slot() else {
            drop(sock);
            return;
        };
        // Relaxed: round-robin position; any interleaving spreads connections well enough.
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let (export, limit, live) = (self.export.clone(), self.limit, self.live.clone());
        let (limits, tls) = (self.limits.clone(), self.tls.clone());
        let sent = self.workers[i].oneshot(move |r| match wrap(sock) {
            Ok(sock) => r
                .spawn_local(async move {
                    let _slot = slot;
                    let _live = live.enter();
                    connection(sock, export, limit, limits, tls).await
                })
                .detach(),
            Err(e) => tracing::warn!("nbd: connection setup: {e}"),
        });
        if sent.is_err() {
            tracing::warn!("nbd: IoThread {i} has stopped; connection dropped");
        }
    }
}

/// News from any thread that a connection closed, which the accept loops (TCP and Unix, on
/// the accept thread's reactor) can wait for.
#[derive(Default)]
pub(crate) struct Freed {
    /// Counts the closes; a waiter returns once it differs from what it saw first.
    closes: AtomicU64,
    /// At most one waker per waiting accept loop.
    wakers: Mutex<Vec<Waker>>,
}

impl Freed {
    fn notify(&self) {
        // Relaxed: the mutex below orders it with `wait` (add, then lock; lock, then load).
        self.closes.fetch_add(1, Ordering::Relaxed);
        let woken = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in woken {
            w.wake();
        }
    }

    /// Waits for a connection to close, at most `limit`.
    async fn wait(&self, limit: Duration) {
        // Relaxed: ordered by the mutex (see `notify`).
        let seen = self.closes.load(Ordering::Relaxed);
        let closed = poll_fn(|cx| {
            // Relaxed: as above.
            if self.closes.load(Ordering::Relaxed) != seen {
                return Poll::Ready(());
            }
            {
                let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
            }
            // Relaxed: a notify that took the lock before us counted before it; one that
            // takes it after us finds the waker.
            if self.closes.load(Ordering::Relaxed) != seen {
                return Poll::Ready(());
            }
            Poll::Pending
        });
        let _ = reactor::time::timeout(limit, closed).await;
    }
}

/// Accept errors back off from 10 ms, doubling to 1 s while they go on; a closing connection
/// ends the pause at once (it freed an fd).
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// After an accept error (EMFILE, ENFILE, ENOMEM, ENOBUFS, ...): log it (rate-limited), back
/// off, go on. Returns the next pause.
async fn accept_failed(e: io::Error, d: &Dispatch, pause: Duration) -> Duration {
    ACCEPT_FAILED.log(|suppressed| {
        tracing::warn!(
            suppressed,
            "nbd: accept: {e} (retrying; pausing up to {pause:?})"
        )
    });
    d.freed.wait(pause).await;
    (pause * 2).min(ACCEPT_BACKOFF_MAX)
}

async fn accept_tcp(l: std::net::TcpListener, d: Arc<Dispatch>) {
    let l = match TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => return tracing::error!("nbd: TCP listener: {e}"),
    };
    let mut pause = ACCEPT_BACKOFF_FIRST;
    loop {
        match l.accept_std().await {
            Ok((s, peer)) => {
                pause = ACCEPT_BACKOFF_FIRST;
                tracing::debug!(%peer, "nbd: connection");
                let _ = s.set_nodelay(true);
                d.dispatch(s, |s| TcpStream::from_std(s).map(Sock::tcp));
            }
            Err(e) => pause = accept_failed(e, &d, pause).await,
        }
    }
}

async fn accept_unix(l: std::os::unix::net::UnixListener, d: Arc<Dispatch>) {
    let l = match UnixListener::from_std(l) {
        Ok(l) => l,
        Err(e) => return tracing::error!("nbd: Unix listener: {e}"),
    };
    let mut pause = ACCEPT_BACKOFF_FIRST;
    loop {
        match l.accept_std().await {
            Ok(s) => {
                pause = ACCEPT_BACKOFF_FIRST;
                d.dispatch(s, |s| UnixStream::from_std(s).map(Sock::unix));
            }
            Err(e) => pause = accept_failed(e, &d, pause).await,
        }
    }
}

/// Failed TLS handshakes: logged at most once a second (a client can fail them in a loop).
static TLS_FAILED: RateLimit = RateLimit::new(Duration::from_secs(1));

/// One client, from the greeting to the close.
async fn connection(
    sock: Sock,
    export: Arc<Export>,
    limit: Option<Duration>,
    limits: Limits,
    tls: Option<Arc<Tls>>,
) {
    let mut rd = Reader::new();
    // A shutdown during negotiation simply closes: nothing is in flight yet.
    let negotiation = async {
        Stop::current()
            .unless_stopped(handshake::negotiate(sock, &mut rd, &export, tls.as_deref()))
            .await
            .unwrap_or(Ok(Outcome::Aborted))
    };
    // The limit covers a TLS handshake too: a client that stalls in it is cut there.
    let outcome = match limit {
        Some(limit) => reactor::time::timeout(limit, negotiation)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no export chosen within {limit:?}"),
                ))
            }),
        None => negotiation.await,
    };
    let res = match outcome {
        Ok(Outcome::Transmission(sock, got)) => {
            transmission::serve(sock, rd, export, got, limits).await
        }
        Ok(Outcome::Aborted) => Ok(()),
        Err(e) => Err(e),
    };
    match res {
        Ok(()) => tracing::debug!("nbd: connection closed"),
        Err(e) if crate::tls::stream::is_handshake_failure(&e) => {
            TLS_FAILED.log(|suppressed| tracing::warn!(suppressed, "nbd: {e}"))
        }
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!("nbd: client went away: {e}")
        }
        Err(e) => tracing::warn!("nbd: connection closed: {e}"),
    }
}

/// Starts the accept loops of `listeners` on the accept thread `h`, and the task that gives
/// memory back after bursts of connections (`memory.rs`).
///
/// # Errors
/// The accept thread has stopped.
pub(crate) fn start(
    h: &reactor::Handle,
    d: &Arc<Dispatch>,
    listeners: Vec<Listener>,
) -> io::Result<()> {
    for l in listeners {
        let d = d.clone();
        h.oneshot(move |r| match l {
            Listener::Tcp(l) => {
                let l = Arc::into_inner(l).expect("the only reference");
                r.spawn_local(accept_tcp(l, d)).detach()
            }
            Listener::Unix(l) => {
                let l = Arc::into_inner(l).expect("the only reference");
                r.spawn_local(accept_unix(l, d)).detach()
            }
        })
        .map_err(closed)?;
    }
    let (conns, d) = (d.conns.clone(), d.clone());
    let closes = move |limit| {
        let d = d.clone();
        async move { d.freed.wait(limit).await }
    };
    h.oneshot(move |r| r.spawn_local(memory::give_back(conns, closes)).detach())
        .map_err(closed)
}

fn closed(_: reactor::Closed) -> io::Error {
    io::Error::other("nbd-server: the accept thread stopped while starting")
}
