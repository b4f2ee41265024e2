//! The server: listeners on an accept thread, connections spread over IoThreads.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The default [`Config::handshake_limit`].
pub const DEFAULT_HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// The default [`Config::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// File descriptors kept free of connections by the default [`Config::max_connections`]:
/// for the export, the listeners, the reactors, the thread pool and the log.
pub const RESERVED_FDS: usize = 64;

use reactor::{Backend, Builder, IoThread, PollParams};

use crate::accept::{self, Dispatch, Freed};
use crate::activation::{Endpoint, Listener};
use crate::budget::{self, Budget};
use crate::export::{Export, ExportStats};
use crate::memory::{self, Connections, Load};
use crate::session::Limits;
use crate::stop::{Live, Stop};

/// How long a shutdown waits for connections to finish their requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The default polling of the IoThreads ([`Config::poll`]): adaptive, up to 200 µs.
pub const DEFAULT_POLL: PollParams = PollParams {
    max: Duration::from_micros(200),
    grow: 2,
    shrink: 0,
};

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
    /// Listening sockets made elsewhere (systemd socket activation, see
    /// [`listen_fds`](crate::activation::listen_fds); a parent process), served besides
    /// `tcp` and `unix`. Empty by default.
    pub listeners: Vec<Listener>,
    /// IoThreads serving connections (round robin); at least 1.
    pub iothreads: usize,
    /// Longest time a client may take from connecting to choosing the export; it is
    /// disconnected after that (so idle half-open connections cannot pile up). `None`: no
    /// limit. Default 10 s.
    pub handshake_limit: Option<Duration>,
    /// Payload bytes of all connections' requests in flight at once (write data being
    /// written, read data not yet sent), on top of each connection's own 64 MiB cap.
    /// Admission waits, never fails, while it is spent. Default
    /// [`DEFAULT_MAX_MEMORY`](crate::DEFAULT_MAX_MEMORY) (512 MiB); at least
    /// [`MIN_MAX_MEMORY`](crate::MIN_MAX_MEMORY) (64 MiB).
    pub max_memory: usize,
    /// Connections served at once; one more is closed as soon as it is accepted. `None`:
    /// the process's fd limit less [`RESERVED_FDS`], read at start.
    pub max_connections: Option<usize>,
    /// Longest time a client may leave its replies unread (a send makes no progress) before
    /// it is disconnected, so that clients holding their share of the memory budget cannot
    /// keep the others waiting longer than that. `None`: no limit. Default 60 s.
    pub idle_timeout: Option<Duration>,
    /// How the export uses the page cache (default [`Cache::Writeback`](crate::Cache)).
    pub cache: crate::Cache,
    /// TLS: credentials and whether clients may or must use it (`None`, the default: TLS
    /// is off, `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`).
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// The reactor backend of every thread.
    pub backend: Backend,
    /// Adaptive polling of the IoThreads ([`DEFAULT_POLL`]: up to 200 µs), while none of
    /// their connections has more than [`poll_depth`](Self::poll_depth) requests unanswered.
    /// [`PollParams::OFF`] turns it off.
    ///
    /// The ceiling must cover the time a client takes to answer a reply with its next
    /// request, and on a VM that includes waking its halted CPU: on the 2-vCPU bench VM,
    /// `qemu-img bench` at queue depth 1 went from about 10–15k requests/s without polling
    /// to 11k with 32 µs, 24–30k with 64 µs (13k in one bench run, where the client's turn
    /// took longer) and 27–33k with 200 µs, at about the same CPU per request (29–36 µs
    /// against 27–35 µs: the IoThread spins for most of the time between requests, where it
    /// would otherwise sleep and be woken). A spin that ends without work is CPU spent for
    /// nothing: a client whose requests come further apart than the ceiling costs a spin of
    /// up to the ceiling now and then, as the poll time grows back after each reset. Polling
    /// shrinks back to nothing when the server idles (a wait longer than the ceiling), and
    /// stops spinning while the IoThread shares its CPU with a busy thread (see
    /// [`PollParams`]).
    pub poll: PollParams,
    /// An IoThread stops polling when a request is admitted with more than this many
    /// requests of its connection unanswered (admitted, and their reply not yet sent), and polls again once 64 requests in a row over
    /// its connections were admitted at most this deep (default [`DEFAULT_POLL_DEPTH`]; 0:
    /// poll at any depth). A deep queue keeps the server busy without polling, and polling
    /// between its batches costs CPU: at QD32, polling always (200 µs) added 1.5–3.2 µs of
    /// CPU to each read and 1.1–1.9 µs to each write in three bench runs, for more
    /// requests/s. The pause is the IoThread's: one deep client pauses it for the shallow
    /// clients it serves too (more IoThreads keep them apart). See
    /// [`ExportStats::polling_pauses`](crate::ExportStats::polling_pauses).
    pub poll_depth: usize,
    /// How the IoThreads' sockets do I/O on the io_uring backend (see
    /// [`SocketIo`](reactor::net::SocketIo); ignored on epoll). Default: the reactor's,
    /// [`SocketIo::Completion`](reactor::net::SocketIo::Completion).
    pub socket_io: reactor::net::SocketIo,
    /// Whether the IoThreads make small buffered writes of whole pages themselves while they
    /// are fast, instead of handing each to a pool thread (see
    /// [`File::set_inline_writes`](reactor::fs::File::set_inline_writes): a write that waited
    /// sends the writes to the pool until they are fast again). On by default. With 4 KiB
    /// writes from `qemu-img bench` on ext4 (three A/B runs) it took server CPU per request
    /// from 13.0–13.7 to 8.4–9.5 µs at QD1 (server and client on one CPU) and from 7.1–7.7 to
    /// 5.8–6.3 µs at QD32, where requests/s went from 89–92k to 107–114k. Off, no IoThread
    /// ever waits in a write.
    pub inline_writes: bool,
    /// Mountpoints (regular files) where the export is also served as a file over FUSE
    /// (`--fuse`; root only). See [`fuse`](crate::fuse).
    pub fuse: Vec<PathBuf>,
    /// How the FUSE exports' requests arrive (`--fuse-transport`).
    pub fuse_transport: crate::fuse::Transport,
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
            listeners: Vec::new(),
            iothreads: 1,
            handshake_limit: Some(DEFAULT_HANDSHAKE_LIMIT),
            max_memory: budget::DEFAULT_MAX_MEMORY,
            max_connections: None,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            cache: crate::Cache::Writeback,
            tls: None,
            backend: Backend::Auto,
            poll: DEFAULT_POLL,
            poll_depth: crate::polling::DEFAULT_POLL_DEPTH,
            socket_io: reactor::net::SocketIo::default(),
            inline_writes: true,
            fuse: Vec::new(),
            fuse_transport: crate::fuse::Transport::Auto,
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
    endpoints: Vec<Endpoint>,
    acceptor: Option<IoThread>,
    workers: Vec<IoThread>,
    stopper: Stopper,
    live: Arc<Live>,
    budget: Arc<Budget>,
    conns: Arc<Connections>,
    fuse: Vec<crate::fuse::FuseExport>,
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
    /// No listener configured, 0 IoThreads, 0 connections, a memory budget under 64 MiB
    /// (`InvalidInput`); the file cannot be opened; a listener cannot be bound; a reactor
    /// cannot be built with the chosen backend.
    pub fn start(config: Config) -> io::Result<Server> {
        let max_connections = check(&config)?;
        let export = Export::open_cached(
            &config.path,
            &config.export_name,
            &config.description,
            config.read_only,
            config.cache,
        )?;
        export.file().set_inline_writes(config.inline_writes);
        let (mut listeners, endpoints) = bind_network(&config)?;
        let mut server = Server::spawn_threads(&config, export, endpoints)?;
        let dispatch = server.dispatch(&config, max_connections);
        // Bound last, once nothing else can fail before `server` owns (and on drop removes)
        // the socket file.
        if let Some(p) = &config.unix {
            listeners.push(Listener::from(bind_unix(p)?));
            server.unix = Some(p.clone());
            server.endpoints.push(Endpoint::Unix(p.clone()));
        }
        let acceptor = server.acceptor.as_ref().expect("just started").handle();
        accept::start(acceptor, &dispatch, listeners)?;
        server.mount_fuse(&config)?;
        tracing::info!(?server, backend = ?config.backend, "nbd server started");
        Ok(server)
    }

    /// The IoThreads and the accept thread, and the server that owns them (its listeners not
    /// yet serving).
    fn spawn_threads(
        config: &Config,
        export: Arc<Export>,
        endpoints: Vec<Endpoint>,
    ) -> io::Result<Server> {
        // FUSE over io_uring needs rings of 128-byte SQEs; nothing else asks for them.
        let sqe128 =
            !config.fuse.is_empty() && config.fuse_transport != crate::fuse::Transport::Classic;
        let builder = || {
            Builder::new()
                .backend(config.backend)
                .sqe128(sqe128)
                .socket_io(config.socket_io)
                .poll(config.poll)
        };
        let workers = (0..config.iothreads)
            .map(|i| IoThread::spawn(format!("nbd-io{i}"), builder()))
            .collect::<io::Result<Vec<_>>>()?;
        let acceptor = IoThread::spawn("nbd-accept", builder().poll(PollParams::OFF))?;
        let tcp_addr = endpoints.iter().find_map(|e| match e {
            Endpoint::Tcp(a) => Some(*a),
            _ => None,
        });
        Ok(Server {
            export,
            tcp_addr,
            unix: None,
            endpoints,
            acceptor: Some(acceptor),
            workers,
            stopper: Stopper::default(),
            live: Arc::new(Live::default()),
            budget: Budget::new(config.max_memory),
            conns: Arc::new(Connections::default()),
            fuse: Vec::new(),
        })
    }

    /// Mounts the FUSE exports (see [`Config::fuse`]), served by the IoThreads.
    fn mount_fuse(&mut self, config: &Config) -> io::Result<()> {
        if config.fuse.is_empty() {
            return Ok(());
        }
        let handles: Vec<reactor::Handle> =
            self.workers.iter().map(|w| w.handle().clone()).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        handles[0]
            .oneshot(move |r| {
                let _ = tx.send(r.sqe128());
            })
            .map_err(|_| io::Error::other("an IoThread has stopped"))?;
        let uring = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .map_err(|_| io::Error::other("an IoThread did not answer"))?;
        for m in &config.fuse {
            let f = crate::fuse::FuseExport::start(
                self.export.clone(),
                m,
                config.fuse_transport,
                &handles,
                uring,
            )?;
            self.fuse.push(f);
        }
        Ok(())
    }

    /// Each FUSE export's mountpoint and the transport it runs on.
    pub fn fuse_mounts(&self) -> Vec<(PathBuf, crate::fuse::Transport)> {
        self.fuse
            .iter()
            .map(|f| (f.mountpoint().to_owned(), f.transport()))
            .collect()
    }

    /// Requests served by the FUSE exports so far, and how many of them came through the
    /// io_uring transport's ring.
    pub fn fuse_requests(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.fuse.iter().fold((0, 0), |(a, b), f| {
            // Relaxed: statistics.
            (
                a + f.stats().requests.load(Relaxed),
                b + f.stats().ring_requests.load(Relaxed),
            )
        })
    }

    /// What hands this server's connections to its IoThreads.
    fn dispatch(&self, config: &Config, max_connections: usize) -> Arc<Dispatch> {
        Arc::new(Dispatch {
            export: self.export.clone(),
            workers: self.workers.iter().map(|w| w.handle().clone()).collect(),
            next: AtomicUsize::new(0),
            limit: config.handshake_limit,
            live: self.live.clone(),
            limits: Limits {
                budget: self.budget.clone(),
                idle: config.idle_timeout,
                poll: crate::polling::Policy {
                    params: config.poll,
                    depth: config.poll_depth,
                },
            },
            tls: config.tls.clone(),
            max_connections,
            conns: self.conns.clone(),
            freed: Freed::default(),
        })
    }

    /// The TCP address listened on (with the port chosen when the config said 0); without
    /// [`Config::tcp`], the first inherited TCP listener's.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Every address listened on: [`Config::tcp`], then the inherited listeners, then
    /// [`Config::unix`].
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The Unix socket listened on.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_deref()
    }

    /// The export's counters so far (requests are added when their connection ends).
    pub fn stats(&self) -> ExportStats {
        self.export.stats()
    }

    /// The connections served now, and what each IoThread's reactor holds (tasks, fd
    /// registrations, io_uring operations in flight): after a burst of connections closes,
    /// it comes back to what it was before.
    ///
    /// # Errors
    /// An IoThread that has stopped, or does not answer within a second.
    pub fn load(&self) -> io::Result<Load> {
        let handles: Vec<reactor::Handle> =
            self.workers.iter().map(|w| w.handle().clone()).collect();
        memory::load_of(&handles, self.conns.now())
    }

    /// Payload bytes held against [`Config::max_memory`] now, by every connection.
    pub fn memory_in_use(&self) -> usize {
        self.budget.used()
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
        // The FUSE exports first, while the IoThreads still serve them: the unmount ends
        // their connections, which ends their ring entries.
        for mut f in self.fuse.drain(..) {
            f.stop();
        }
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

/// The configuration's limits checked; the connection limit it comes to.
fn check(config: &Config) -> io::Result<usize> {
    let invalid = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    if config.max_memory < budget::MIN_MAX_MEMORY {
        return invalid(format!(
            "nbd-server: the memory budget must be at least {} MiB (two of the largest requests)",
            budget::MIN_MAX_MEMORY >> 20
        ));
    }
    let max_connections = config
        .max_connections
        .unwrap_or_else(default_max_connections);
    if max_connections == 0 {
        return invalid("nbd-server: at least one connection must be allowed".into());
    }
    if config.tcp.is_none()
        && config.unix.is_none()
        && config.listeners.is_empty()
        && config.fuse.is_empty()
    {
        return invalid(
            "nbd-server: give a TCP address, a Unix socket path, a listening socket or a FUSE \
             mountpoint"
                .into(),
        );
    }
    if config.iothreads == 0 {
        return invalid("nbd-server: at least one IoThread is needed".into());
    }
    Ok(max_connections)
}

/// The TCP listener bound, and the inherited listeners (each its own fd, so that the config
/// keeps its copy): the listeners in the order they are served, and their endpoints.
fn bind_network(config: &Config) -> io::Result<(Vec<Listener>, Vec<Endpoint>)> {
    let mut listeners = Vec::with_capacity(1 + config.listeners.len());
    let mut endpoints = Vec::with_capacity(2 + config.listeners.len());
    if let Some(addr) = config.tcp {
        let l = std::net::TcpListener::bind(addr)?;
        endpoints.push(Endpoint::Tcp(l.local_addr()?));
        listeners.push(Listener::from(l));
    }
    for l in &config.listeners {
        endpoints.push(l.endpoint()?);
        listeners.push(match l {
            Listener::Tcp(l) => Listener::from(l.try_clone()?),
            Listener::Unix(l) => Listener::from(l.try_clone()?),
        });
    }
    Ok((listeners, endpoints))
}

fn bind_unix(p: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    std::os::unix::net::UnixListener::bind(p)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// The default [`Config::max_connections`]: the fd limit less [`RESERVED_FDS`].
fn default_max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to write.
    let cur = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    cur.saturating_sub(RESERVED_FDS).max(1)
}
