//! The command line of the `nbd-server` binary (parsed by clap: `--help`, `--version`,
//! suggestions for mistyped options, and an `NBD_SERVER_*` environment variable behind most
//! options), and the program itself ([`main`]).

use std::io::{self, Write};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use reactor::PollParams;

use crate::activation::{self, Listener, PidFile};
use crate::server::{Config, Server};

const AFTER_HELP: &str = "\
Logs to stderr at the level NBD_SERVER_LOG names (error, warn, info, debug, trace; default
warn). Runs until SIGINT or SIGTERM. Prints one line per listener on stdout once it serves:
  nbd-server: listening on tcp 127.0.0.1:10809
  nbd-server: listening on unix /run/disk.sock
On SIGUSR1 it prints its load on stdout: the connections it serves, and each IoThread's
tasks, fd registrations and io_uring operations in flight (back to their idle values once
the connections are gone):
  nbd-server: load: connections 0; iothread 0: tasks 1 fds 1 ops 0

Socket activation: started by systemd with LISTEN_PID and LISTEN_FDS, it serves the passed
listening sockets (TCP or Unix) instead of --bind and --socket, which it then refuses; with
NOTIFY_SOCKET set it sends READY=1 once it serves (for Type=notify units).";

/// How sockets do I/O on the io_uring backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SocketIoArg {
    /// Each read and write is an io_uring operation.
    Completion,
    /// Wait for readiness, then read or write with a system call.
    Readiness,
}

/// Serves FILE (a regular file or a block device) over NBD: fixed newstyle negotiation,
/// structured replies, base:allocation block status, multi-conn.
#[derive(Debug, Parser)]
#[command(name = "nbd-server", version, after_help = AFTER_HELP)]
pub struct Args {
    /// The file (or block device) to export.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// TCP address to listen on (default 127.0.0.1:10809 unless --socket is given or
    /// sockets are passed; port 0 picks a free one).
    #[arg(short = 'b', long, value_name = "ADDR", env = "NBD_SERVER_BIND")]
    pub bind: Option<SocketAddr>,
    /// Unix socket to listen on (created; removed at exit).
    #[arg(
        short = 'k',
        long = "socket",
        value_name = "PATH",
        env = "NBD_SERVER_SOCKET"
    )]
    pub socket: Option<PathBuf>,
    /// Export name ("" always reaches the export too).
    #[arg(
        short = 'x',
        long,
        value_name = "NAME",
        default_value = "",
        env = "NBD_SERVER_EXPORT_NAME"
    )]
    pub export_name: String,
    /// Export description.
    #[arg(short = 'D', long, value_name = "TEXT", default_value = "")]
    pub description: String,
    /// Refuse writes with EPERM (and open FILE read-only).
    #[arg(short = 'r', long, env = "NBD_SERVER_READ_ONLY")]
    pub read_only: bool,
    /// IoThreads serving connections, round robin.
    #[arg(
        short = 't',
        long,
        value_name = "N",
        default_value = "1",
        env = "NBD_SERVER_IOTHREADS"
    )]
    pub iothreads: NonZeroUsize,
    /// Seconds a client may take to choose the export (0: no limit).
    #[arg(long, value_name = "S", default_value = "10", value_parser = seconds, allow_negative_numbers = true, env = "NBD_SERVER_HANDSHAKE_LIMIT")]
    pub handshake_limit: Seconds,
    /// Payload bytes in flight across all connections (K, M, G suffixes; at least 64M);
    /// admission waits beyond it.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = memory, env = "NBD_SERVER_MAX_MEMORY")]
    pub max_memory: usize,
    /// Connections served at once; more are closed at once (default: the fd limit less 64).
    #[arg(long, value_name = "N", env = "NBD_SERVER_MAX_CONNECTIONS")]
    pub max_connections: Option<NonZeroUsize>,
    /// Seconds a client may leave its replies unread before it is disconnected (0: no limit).
    #[arg(long, value_name = "S", default_value = "60", value_parser = seconds, allow_negative_numbers = true, env = "NBD_SERVER_IDLE_TIMEOUT")]
    pub idle_timeout: Seconds,
    /// Reactor backend: auto, uring or epoll (auto follows REACTOR_BACKEND if set).
    #[arg(long, value_name = "B", default_value = "auto")]
    pub backend: reactor::Backend,
    /// Adaptive busy polling ceiling of the IoThreads in ns (0: off).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 200_000,
        env = "NBD_SERVER_POLL_MAX_NS"
    )]
    pub poll_max_ns: u64,
    /// IoThreads poll only while no connection of theirs has more than D requests unanswered
    /// (admitted, reply not yet sent; 0: at any depth).
    #[arg(
        long,
        value_name = "D",
        default_value_t = crate::DEFAULT_POLL_DEPTH,
        env = "NBD_SERVER_POLL_DEPTH"
    )]
    pub poll_depth: usize,
    /// How sockets do I/O on io_uring (ignored on epoll).
    #[arg(long, value_name = "M", value_enum, default_value = "completion")]
    socket_io: SocketIoArg,
    /// Hand every write that needs a blocking call (buffered writes on ext4 and tmpfs) to a
    /// pool thread, so that no IoThread ever waits in one (by default small writes of whole
    /// pages are made by the IoThread while they are fast).
    #[arg(long, env = "NBD_SERVER_NO_INLINE_WRITES")]
    pub no_inline_writes: bool,
    /// Page cache: writeback (through it) or none (O_DIRECT, aligned I/O; through the ring
    /// on io_uring).
    #[arg(
        long,
        value_name = "MODE",
        value_enum,
        default_value = "writeback",
        env = "NBD_SERVER_CACHE"
    )]
    pub cache: crate::Cache,
    /// TLS: off (STARTTLS refused), on (clients choose) or require (nothing but STARTTLS
    /// before TLS).
    #[arg(
        long,
        value_name = "MODE",
        value_enum,
        default_value = "off",
        env = "NBD_SERVER_TLS"
    )]
    pub tls: crate::tls::TlsMode,
    /// x509 credentials: a directory with server-cert.pem, server-key.pem and (with
    /// --tls-verify-peer) ca-cert.pem, as QEMU and nbdkit lay them out.
    #[arg(long, value_name = "DIR", env = "NBD_SERVER_TLS_CERTIFICATES")]
    pub tls_certificates: Option<PathBuf>,
    /// Pre-shared keys: a file of username:hexkey lines (psktool's format).
    #[arg(long, value_name = "FILE", env = "NBD_SERVER_TLS_PSK")]
    pub tls_psk: Option<PathBuf>,
    /// Require a client certificate signed by the directory's ca-cert.pem.
    #[arg(long, env = "NBD_SERVER_TLS_VERIFY_PEER")]
    pub tls_verify_peer: bool,
    /// Let in only this client identity: a PSK username, or a certificate's subject DN as
    /// RFC 4514 writes it (CN=client,O=Example). Repeatable.
    #[arg(long, value_name = "ID")]
    pub tls_allow: Vec<String>,
    /// Also serve the export as a file over FUSE, mounted over the regular file MOUNTPOINT
    /// (root only; unmounted at exit). Repeatable. With --fuse and neither --bind nor
    /// --socket, no NBD listener is opened.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub fuse: Vec<PathBuf>,
    /// FUSE transport: auto (io_uring where the kernel offers it and the backend is
    /// io_uring, else classic), uring or classic (/dev/fuse reads and writes).
    #[arg(
        long,
        value_name = "T",
        value_enum,
        default_value = "auto",
        env = "NBD_SERVER_FUSE_TRANSPORT"
    )]
    pub fuse_transport: crate::fuse::Transport,
    /// Write the process id to PATH once serving (replacing a stale file); removed at exit.
    #[arg(long, value_name = "PATH", env = "NBD_SERVER_PID_FILE")]
    pub pid_file: Option<PathBuf>,
    /// Run in the background: the command returns once the server serves (its pid file and
    /// listening lines written), and the server's standard streams then go to /dev/null.
    #[arg(long)]
    pub fork: bool,
}

/// Seconds given on the command line; `None` for 0 (no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seconds(pub Option<Duration>);

fn seconds(v: &str) -> Result<Seconds, String> {
    let secs: f64 = v
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s < 1e9)
        .ok_or("want seconds, 0 or more")?;
    Ok(Seconds((secs > 0.0).then(|| Duration::from_secs_f64(secs))))
}

/// A byte count with an optional K, M or G suffix (powers of 1024), at least 64M.
fn memory(v: &str) -> Result<usize, String> {
    let (digits, shift) = match v.as_bytes().last() {
        Some(b'k' | b'K') => (&v[..v.len() - 1], 10),
        Some(b'm' | b'M') => (&v[..v.len() - 1], 20),
        Some(b'g' | b'G') => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n >= crate::MIN_MAX_MEMORY)
        .ok_or_else(|| "want a size of 64M or more".into())
}

/// Parses the arguments (without the program name).
///
/// # Errors
/// clap's error for a bad or missing argument (its message names it), and for `--help` and
/// `--version` (whose "error" is the text to print; [`clap::Error::exit`] prints it).
///
/// ```
/// use nbd_server::args::parse;
/// let a = parse(["-r", "-t", "2", "--bind", "127.0.0.1:0", "disk.raw"]).unwrap();
/// let cfg = a.config(Vec::new())?;
/// assert!(cfg.read_only);
/// assert_eq!(cfg.iothreads, 2);
/// assert_eq!(cfg.tcp.unwrap().port(), 0);
/// assert!(parse(["--iothreads", "zero", "disk.raw"]).is_err());
/// let cfg = parse(["--max-memory", "1G", "--idle-timeout", "0", "disk.raw"]).unwrap().config(Vec::new())?;
/// assert_eq!(cfg.max_memory, 1 << 30);
/// assert_eq!(cfg.idle_timeout, None);
/// assert!(parse(["--max-memory", "1M", "disk.raw"]).is_err(), "below the 64M floor");
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn parse<I, S>(args: I) -> Result<Args, clap::Error>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let argv = std::iter::once(std::ffi::OsString::from("nbd-server"))
        .chain(args.into_iter().map(Into::into));
    Args::try_parse_from(argv)
}

impl Args {
    /// The server configuration, serving `passed` (sockets from socket activation) when
    /// there are any.
    ///
    /// # Errors
    /// `InvalidInput` when sockets were passed and `--bind` or `--socket` was given too;
    /// the TLS options' errors ([`Tls::new`](crate::tls::Tls::new)).
    pub fn config(&self, passed: Vec<Listener>) -> io::Result<Config> {
        let mut cfg = Config::new(&self.file);
        if !passed.is_empty() && (self.bind.is_some() || self.socket.is_some()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket activation (LISTEN_FDS) passed listening sockets: --bind and --socket \
                 cannot be used with it",
            ));
        }
        cfg.tcp = match (self.bind, &self.socket, passed.is_empty()) {
            (Some(b), _, _) => Some(b),
            // FUSE alone: no NBD listener unless one is asked for.
            (None, None, true) if self.fuse.is_empty() => cfg.tcp,
            _ => None,
        };
        cfg.fuse = self.fuse.clone();
        cfg.fuse_transport = self.fuse_transport;
        cfg.unix = self.socket.clone();
        cfg.listeners = passed;
        cfg.export_name = self.export_name.clone();
        cfg.description = self.description.clone();
        cfg.read_only = self.read_only;
        cfg.iothreads = self.iothreads.get();
        cfg.handshake_limit = self.handshake_limit.0;
        cfg.max_memory = self.max_memory;
        cfg.max_connections = self.max_connections.map(NonZeroUsize::get);
        cfg.idle_timeout = self.idle_timeout.0;
        cfg.backend = self.backend;
        cfg.poll = match self.poll_max_ns {
            0 => PollParams::OFF,
            ns => PollParams {
                max: Duration::from_nanos(ns),
                ..crate::DEFAULT_POLL
            },
        };
        cfg.poll_depth = self.poll_depth;
        cfg.socket_io = match self.socket_io {
            SocketIoArg::Completion => reactor::net::SocketIo::Completion,
            SocketIoArg::Readiness => reactor::net::SocketIo::Readiness,
        };
        cfg.inline_writes = !self.no_inline_writes;
        cfg.cache = self.cache;
        let tls = crate::tls::TlsOptions {
            certificates: self.tls_certificates.clone(),
            psk: self.tls_psk.clone(),
            verify_peer: self.tls_verify_peer,
            allow: self.tls_allow.clone(),
        };
        cfg.tls = match self.tls {
            // Any TLS option with --tls off is a mistake that Tls::new names.
            crate::tls::TlsMode::Off
                if tls.certificates.is_none()
                    && tls.psk.is_none()
                    && !tls.verify_peer
                    && tls.allow.is_empty() =>
            {
                None
            }
            mode => Some(std::sync::Arc::new(crate::tls::Tls::new(mode, &tls)?)),
        };
        Ok(cfg)
    }
}

/// The whole `nbd-server` program: parses `args` (without the program name), serves until
/// SIGINT or SIGTERM, and returns the exit status (2 for a bad command line, 1 when the
/// server cannot start). The binary is this function; the bench runs it too (in a child
/// process of its own), so the figures are the binary's.
pub fn main(args: impl IntoIterator<Item = String>) -> std::process::ExitCode {
    use std::process::ExitCode;
    let args = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let cfg = match activation::listen_fds().and_then(|passed| args.config(passed)) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("nbd-server: {e}");
            return ExitCode::from(2);
        }
    };
    // Before any thread starts (logging and the allocator start none).
    let detached = if args.fork {
        match crate::daemon::fork() {
            Ok(crate::daemon::Forked::Parent(status)) => return status,
            Ok(crate::daemon::Forked::Child(d)) => Some(d),
            Err(e) => {
                eprintln!("nbd-server: --fork: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    init_logging();
    crate::tune_allocator();
    let signals = block_signals();
    let server = match Server::start(cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nbd-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _pid_file = match args.pid_file.as_deref().map(PidFile::write).transpose() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nbd-server: --pid-file {e}");
            return ExitCode::FAILURE;
        }
    };
    announce(&server, detached);
    serve_until_stopped(&server, &signals);
    let stats = server.shutdown();
    tracing::info!(?stats, "nbd-server: stopped");
    ExitCode::SUCCESS
}

/// Blocks SIGINT, SIGTERM and SIGUSR1 on this thread, before any other thread starts, so
/// every thread inherits the mask and this thread alone takes them, with `sigwait`. Returns
/// the set.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Says the server is up: its endpoints on stdout, systemd's `READY=1`, and (with `--fork`)
/// the parent's exit.
fn announce(server: &Server, detached: Option<crate::daemon::Detached>) {
    {
        let mut out = std::io::stdout().lock();
        for e in server.endpoints() {
            let _ = writeln!(out, "nbd-server: listening on {e}");
        }
        for (m, t) in server.fuse_mounts() {
            let _ = writeln!(
                out,
                "nbd-server: fuse export on {} ({t} transport)",
                m.display()
            );
        }
        let _ = out.flush();
    }
    if let Err(e) = activation::notify_ready() {
        tracing::warn!("nbd-server: telling systemd it is ready (NOTIFY_SOCKET): {e}");
    }
    if let Some(d) = detached {
        if let Err(e) = d.ready() {
            tracing::warn!("nbd-server: --fork: detaching the standard streams: {e}");
        }
    }
}

/// Waits for SIGINT or SIGTERM (blocked by [`block_signals`]); each SIGUSR1 meanwhile prints
/// the server's load on stdout.
fn serve_until_stopped(server: &Server, signals: &libc::sigset_t) {
    loop {
        let mut sig = 0;
        // SAFETY: `signals` is a valid signal set and `sig` a valid out-pointer.
        unsafe { libc::sigwait(signals, &mut sig) };
        if sig != libc::SIGUSR1 {
            return;
        }
        let line = match server.load() {
            Ok(load) => format!("nbd-server: load: {load}"),
            Err(e) => format!("nbd-server: load: {e}"),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// The environment variable naming the log level of [`main`].
pub const LOG_ENV: &str = "NBD_SERVER_LOG";

/// Sends `tracing` events at the level [`LOG_ENV`] names (default warn) to stderr.
fn init_logging() {
    let level = std::env::var(LOG_ENV)
        .ok()
        .and_then(|v| v.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(a: &[&str]) -> Config {
        parse(a.iter().copied())
            .unwrap()
            .config(Vec::new())
            .unwrap()
    }

    #[test]
    fn defaults_and_listeners() {
        let c = serve(&["disk"]);
        assert_eq!(c.tcp, Some("127.0.0.1:10809".parse().unwrap()));
        assert_eq!((c.unix, c.iothreads, c.read_only), (None, 1, false));
        assert_eq!(c.poll, crate::DEFAULT_POLL);
        assert_eq!(c.poll_depth, crate::DEFAULT_POLL_DEPTH);
        let d = serve(&["--poll-depth", "0", "disk"]);
        assert_eq!(d.poll_depth, 0);
        let c = serve(&["-k", "/tmp/s", "disk"]);
        assert_eq!(
            c.tcp, None,
            "a socket alone replaces the default TCP listener"
        );
        let c = serve(&["-k", "/tmp/s", "-b", "0.0.0.0:1", "disk"]);
        assert!(c.tcp.is_some() && c.unix.is_some());
        let c = serve(&[
            "--backend",
            "epoll",
            "--poll-max-ns",
            "0",
            "-x",
            "d",
            "disk",
        ]);
        assert_eq!(c.backend, reactor::Backend::Epoll);
        assert_eq!(c.poll.max, Duration::ZERO);
        assert_eq!(c.socket_io, reactor::net::SocketIo::Completion);
        let r = serve(&["--socket-io", "readiness", "disk"]);
        assert_eq!(r.socket_io, reactor::net::SocketIo::Readiness);
        assert!(c.inline_writes, "inline writes are on by default");
        let n = serve(&["--no-inline-writes", "disk"]);
        assert!(!n.inline_writes);
        assert_eq!(c.export_name, "d");
        assert_eq!(c.handshake_limit, Some(Duration::from_secs(10)));
        let c = serve(&["--handshake-limit", "0", "disk"]);
        assert_eq!(c.handshake_limit, None);
        let c = serve(&["--handshake-limit", "0.5", "disk"]);
        assert_eq!(c.handshake_limit, Some(Duration::from_millis(500)));
        let c = serve(&["--poll-max-ns", "32768", "disk"]);
        assert_eq!(c.poll.max, Duration::from_nanos(32768));
        assert_eq!(
            c.poll,
            PollParams {
                max: Duration::from_nanos(32768),
                ..crate::DEFAULT_POLL
            }
        );
        let c = serve(&["--max-connections", "5", "--max-memory", "64M", "disk"]);
        assert_eq!((c.max_connections, c.max_memory), (Some(5), 64 << 20));
    }

    #[test]
    fn passed_sockets_replace_the_default_listener_and_refuse_explicit_ones() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let passed = vec![Listener::from(l)];
        let c = parse(["disk"]).unwrap().config(passed.clone()).unwrap();
        assert_eq!((c.tcp, c.unix, c.listeners.len()), (None, None, 1));
        for extra in [["-b", "127.0.0.1:0"], ["-k", "/tmp/x"]] {
            let a = parse([extra[0], extra[1], "disk"]).unwrap();
            let e = a.config(passed.clone()).unwrap_err();
            assert!(e.to_string().contains("socket activation"), "{e}");
        }
    }

    #[test]
    fn errors_name_the_argument() {
        for (args, what) in [
            (&["-t", "0", "disk"][..], "--iothreads"),
            (&["--backend", "kqueue", "disk"][..], "kqueue"),
            (&["--bind", "nowhere", "disk"][..], "--bind"),
            (
                &["--handshake-limit", "-1", "disk"][..],
                "--handshake-limit",
            ),
            (&["--frobnicate", "disk"][..], "--frobnicate"),
            (&["--socket-io", "poll", "disk"][..], "--socket-io"),
            (&["--max-memory", "1M", "disk"][..], "64M"),
            (&["disk", "extra"][..], "extra"),
            (&[][..], "FILE"),
            (&["disk", "-x"][..], "--export-name"),
        ] {
            let e = parse(args.iter().copied()).unwrap_err();
            assert!(e.use_stderr(), "{args:?}");
            assert!(e.to_string().contains(what), "{args:?}: {e}");
        }
        // A typo gets a suggestion; --help and --version are not errors.
        let e = parse(["--read-onyl", "disk"]).unwrap_err();
        assert!(e.to_string().contains("--read-only"), "{e}");
        for flag in ["--help", "--version"] {
            let e = parse([flag]).unwrap_err();
            assert!(!e.use_stderr(), "{flag}");
        }
        assert!(
            parse(["--help"])
                .unwrap_err()
                .to_string()
                .contains("LISTEN_FDS")
        );
    }
}
