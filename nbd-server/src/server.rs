//! The server: listeners on an accept thread, connections spread over IoThreads.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The default [`Config::handshake_limit`].
pub const DEFAULT_HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

use reactor::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use reactor::{Backend, Builder, IoThread, PollParams};

use crate::conn::{Reader, Sock};
use crate::export::{Export, ExportStats};
use crate::handshake::{self, Outcome};
use crate::stop::{Live, Stop};
use crate::transmission;

/// How long a shutdown waits for connections to finish their requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How to run a [`Server`].
///
/// ```
/// use nbd_server::Config;
/// let mut cfg = Config::new("disk.raw");
/// cfg.tcp = None;
/// cfg.unix = Some("/run/disk.sock".into());
/// cfg.read_only = true;
/// assert_eq!(cfg.iothreads, 1);
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    /// The file (or block device) to export.
    pub path: PathBuf,
    /// The export's name (`""` by default; clients asking for `""` always get the export).
    pub export_name: String,
    /// A description for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Refuse writes (`EPERM`) and open the file read-only.
    pub read_only: bool,
    /// TCP address to listen on (port 0 picks a free port; see [`Server::tcp_addr`]).
    pub tcp: Option<SocketAddr>,
    /// Unix socket path to listen on; created at start, removed when the server stops. An
    /// existing file there is an error (`AddrInUse`), never silently removed.
    pub unix: Option<PathBuf>,
    /// IoThreads serving connections (round robin); at least 1.
    pub iothreads: usize,
    /// Longest time a client may take from connecting to choosing the export; it is
    /// disconnected after that (so idle half-open connections cannot pile up). `None`: no
    /// limit. Default 10 s.
    pub handshake_limit: Option<Duration>,
    /// The reactor backend of every thread.
    pub backend: Backend,
    /// Adaptive polling of the IoThreads: off by default ([`PollParams::OFF`]), unlike a
    /// plain [`IoThread`]. Measured with `qemu-img bench` over loopback TCP (bench scenario
    /// `nbd`): the next request of a queue-depth-1 client comes later than any sensible
    /// poll window, so polling cost 5–15 µs of CPU per request (writes at QD1: 49.7 µs
    /// with the IoThread default of 32 µs, 34.5 µs without) for at most 20 % more
    /// requests/s. [`PollParams::IOTHREAD`] turns it on.
    pub poll: PollParams,
}

impl Config {
    /// A configuration exporting `path` read-write on `127.0.0.1:10809` (the NBD port) with
    /// one IoThread and the automatic backend choice.
    pub fn new(path: impl Into<PathBuf>) -> Config {
        Config {
            path: path.into(),
            export_name: String::new(),
            description: String::new(),
            read_only: false,
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 10809))),
            unix: None,
            iothreads: 1,
            handshake_limit: Some(DEFAULT_HANDSHAKE_LIMIT),
            backend: Backend::Auto,
            poll: PollParams::OFF,
        }
    }
}

/// A running NBD server. Dropping it stops it (see [`shutdown`](Self::shutdown)).
///
/// ```no_run
/// use nbd_server::{Config, Server};
/// let mut cfg = Config::new("/var/lib/images/disk.raw");
/// cfg.export_name = "disk".into();
/// cfg.iothreads = 2;
/// let server = Server::start(cfg)?;
/// println!("serving on {}", server.tcp_addr().unwrap());
/// server.wait(); // until another thread calls `server.stopper().stop()`
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Server {
    export: Arc<Export>,
    tcp_addr: Option<SocketAddr>,
    unix: Option<PathBuf>,
    acceptor: Option<IoThread>,
    workers: Vec<IoThread>,
    stopper: Stopper,
    live: Arc<Live>,
}

/// Stops a [`Server`] from any thread (a signal-handling thread, a test): its
/// [`wait`](Server::wait) returns.
#[derive(Clone, Debug, Default)]
pub struct Stopper(Arc<(Mutex<bool>, Condvar)>);

impl Stopper {
    /// Asks the server to stop; idempotent.
    pub fn stop(&self) {
        let (lock, cv) = &*self.0;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    fn wait(&self) {
        let (lock, cv) = &*self.0;
        let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !*stopped {
            stopped = cv.wait(stopped).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("export", &self.export.name())
            .field("tcp", &self.tcp_addr)
            .field("unix", &self.unix)
            .field("iothreads", &self.workers.len())
            .finish()
    }
}

impl Server {
    /// Opens the export, binds the listeners, starts the IoThreads and the accept thread.
    ///
    /// # Errors
    /// No listener configured, 0 IoThreads (`InvalidInput`); the file cannot be opened; a
    /// listener cannot be bound; a reactor cannot be built with the chosen backend.
    pub fn start(config: Config) -> io::Result<Server> {
        if config.tcp.is_none() && config.unix.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "nbd-server: give a TCP address or a Unix socket path to listen on",
            ));
        }
        if config.iothreads == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "nbd-server: at least one IoThread is needed",
            ));
        }
        let export = Export::open(
            &config.path,
            &config.export_name,
            &config.description,
            config.read_only,
        )?;
        let tcp = config.tcp.map(std::net::TcpListener::bind).transpose()?;
        let tcp_addr = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
        let builder = || {
            let b = Builder::new().backend(config.backend);
            b.poll(config.poll)
        };
        let workers = (0..config.iothreads)
            .map(|i| IoThread::spawn(format!("nbd-io{i}"), builder()))
            .collect::<io::Result<Vec<_>>>()?;
        let acceptor = IoThread::spawn("nbd-accept", builder().poll(PollParams::OFF))?;
        let mut server = Server {
            export: export.clone(),
            tcp_addr,
            unix: None,
            acceptor: Some(acceptor),
            workers,
            stopper: Stopper::default(),
            live: Arc::new(Live::default()),
        };
        let dispatch = Arc::new(Dispatch {
            export: export.clone(),
            workers: server.workers.iter().map(|w| w.handle().clone()).collect(),
            next: AtomicUsize::new(0),
            limit: config.handshake_limit,
            live: server.live.clone(),
        });
        // Bound last, once nothing else can fail before `server` owns (and on drop removes)
        // the socket file.
        let unix = match &config.unix {
            Some(p) => {
                let l = bind_unix(p)?;
                server.unix = Some(p.clone());
                Some(l)
            }
            None => None,
        };
        let h = server.acceptor.as_ref().expect("just started").handle();
        if let Some(l) = tcp {
            let d = dispatch.clone();
            h.oneshot(move |r| r.spawn_local(accept_tcp(l, d)).detach())
                .map_err(closed)?;
        }
        if let Some(l) = unix {
            h.oneshot(move |r| r.spawn_local(accept_unix(l, dispatch)).detach())
                .map_err(closed)?;
        }
        tracing::info!(?server, backend = ?config.backend, "nbd server started");
        Ok(server)
    }

    /// The TCP address listened on (with the port chosen when the config said 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The Unix socket listened on.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_deref()
    }

    /// The export's counters so far (requests are added when their connection ends).
    pub fn stats(&self) -> ExportStats {
        self.export.stats()
    }

    /// The exported file's size in bytes.
    pub fn size(&self) -> u64 {
        self.export.size()
    }

    /// What stops [`wait`](Self::wait), from any thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Blocks until [`Stopper::stop`] is called, then shuts down as
    /// [`shutdown`](Self::shutdown) does and returns the final counters.
    pub fn wait(self) -> ExportStats {
        self.stopper.wait();
        self.shutdown()
    }

    /// Stops the server and returns its final counters. It stops accepting; every connection
    /// stops reading at its next request boundary, finishes and answers the requests it has in
    /// flight, and closes (what the protocol asks of a server shutting down); after
    /// [`SHUTDOWN_GRACE`] the IoThreads stop regardless, cancelling what is left (a write
    /// cancelled that way was never acknowledged; on epoll a thread-pool job it started may
    /// still complete after this returns). Then the Unix socket is removed.
    pub fn shutdown(mut self) -> ExportStats {
        self.shutdown_now();
        self.export.stats()
    }

    fn shutdown_now(&mut self) {
        drop(self.acceptor.take());
        // Each connection stops at its next request boundary and finishes what is in flight;
        // after the grace period the IoThreads go down regardless.
        for w in &self.workers {
            let _ = w.handle().oneshot(|_| Stop::trigger());
        }
        if !self.workers.is_empty() && !self.live.wait_idle(SHUTDOWN_GRACE) {
            tracing::warn!("nbd: connections still busy after {SHUTDOWN_GRACE:?}; dropping them");
        }
        self.workers.clear();
        if let Some(p) = self.unix.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

fn closed(_: reactor::Closed) -> io::Error {
    io::Error::other("nbd-server: the accept thread stopped while starting")
}

fn bind_unix(p: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    std::os::unix::net::UnixListener::bind(p)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// Hands accepted connections to the IoThreads, round robin.
struct Dispatch {
    export: Arc<Export>,
    workers: Vec<reactor::Handle>,
    next: AtomicUsize,
    limit: Option<Duration>,
    live: Arc<Live>,
}

impl Dispatch {
    /// Sends `sock` (a `std` socket: it crosses threads) to the next IoThread, where `wrap`
    /// registers it with that thread's reactor and the connection task starts.
    fn dispatch<S: Send + 'static>(&self, sock: S, wrap: fn(S) -> io::Result<Sock>) {
        // Relaxed: round-robin position; any interleaving spreads connections well enough.
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let (export, limit, live) = (self.export.clone(), self.limit, self.live.clone());
        let sent = self.workers[i].oneshot(move |r| match wrap(sock) {
            Ok(sock) => r
                .spawn_local(async move {
                    let _live = live.enter();
                    connection(sock, export, limit).await
                })
                .detach(),
            Err(e) => tracing::warn!("nbd: connection setup: {e}"),
        });
        if sent.is_err() {
            tracing::warn!("nbd: IoThread {i} has stopped; connection dropped");
        }
    }
}

/// After an accept error (EMFILE, ENFILE, ENOBUFS, ...): log it, back off a little, go on.
async fn accept_failed(e: io::Error) {
    tracing::warn!("nbd: accept: {e}");
    reactor::time::sleep(Duration::from_millis(10)).await;
}

async fn accept_tcp(l: std::net::TcpListener, d: Arc<Dispatch>) {
    let l = match TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => return tracing::error!("nbd: TCP listener: {e}"),
    };
    loop {
        match l.accept_std().await {
            Ok((s, peer)) => {
                tracing::debug!(%peer, "nbd: connection");
                let _ = s.set_nodelay(true);
                d.dispatch(s, |s| TcpStream::from_std(s).map(Sock::Tcp));
            }
            Err(e) => accept_failed(e).await,
        }
    }
}

async fn accept_unix(l: std::os::unix::net::UnixListener, d: Arc<Dispatch>) {
    let l = match UnixListener::from_std(l) {
        Ok(l) => l,
        Err(e) => return tracing::error!("nbd: Unix listener: {e}"),
    };
    loop {
        match l.accept_std().await {
            Ok(s) => d.dispatch(s, |s| UnixStream::from_std(s).map(Sock::Unix)),
            Err(e) => accept_failed(e).await,
        }
    }
}

/// One client, from the greeting to the close.
async fn connection(sock: Sock, export: Arc<Export>, limit: Option<Duration>) {
    let mut rd = Reader::new();
    // A shutdown during negotiation simply closes: nothing is in flight yet.
    let negotiation = async {
        Stop::current()
            .unless_stopped(handshake::negotiate(&sock, &mut rd, &export))
            .await
            .unwrap_or(Ok(Outcome::Aborted))
    };
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
        Ok(Outcome::Transmission) => transmission::serve(sock, rd, export).await,
        Ok(Outcome::Aborted) => Ok(()),
        Err(e) => Err(e),
    };
    match res {
        Ok(()) => tracing::debug!("nbd: connection closed"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!("nbd: client went away: {e}")
        }
        Err(e) => tracing::warn!("nbd: connection closed: {e}"),
    }
}
