//! The command line of the `nbd-server` binary.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use reactor::PollParams;

use crate::server::{Config, Server};

/// The usage text.
pub const USAGE: &str = "\
usage: nbd-server [OPTIONS] FILE

Serves FILE over NBD (fixed newstyle, simple replies).

  -b, --bind ADDR          TCP address to listen on (default 127.0.0.1:10809 unless
                           --socket is given; port 0 picks a free one)
  -k, --socket PATH        Unix socket to listen on (created; removed at exit)
  -x, --export-name NAME   export name (default \"\"; \"\" always reaches the export)
  -D, --description TEXT   export description
  -r, --read-only          refuse writes with EPERM
  -t, --iothreads N        IoThreads serving connections, round robin (default 1)
      --handshake-limit S  seconds a client may take to choose the export (default 10;
                           0: no limit)
      --max-memory SIZE    payload bytes in flight across all connections (K, M, G
                           suffixes; default 512M, at least 64M); admission waits
                           beyond it
      --max-connections N  connections served at once; more are closed at once
                           (default: the fd limit less 64)
      --idle-timeout S     seconds a client may leave its replies unread before it is
                           disconnected (default 60; 0: no limit)
      --backend B          auto | uring | epoll (default auto; REACTOR_BACKEND also works)
      --poll-max-ns N      adaptive busy polling ceiling of the IoThreads in ns
                           (default 0: off; 32768 is the IoThread default)
      --socket-io M        completion | readiness: how sockets do I/O on io_uring
                           (default completion; ignored on epoll)
  -h, --help               this text

Logs to stderr at the level NBD_SERVER_LOG names (error, warn, info, debug, trace; default
warn). Runs until SIGINT or SIGTERM. Prints one line per listener on stdout once it serves:
  nbd-server: listening on tcp 127.0.0.1:10809
  nbd-server: listening on unix /run/disk.sock";

/// What the command line asks for.
#[derive(Debug)]
// Made once per run: the size of `Serve` costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve with this configuration.
    Serve(Config),
    /// Print the usage.
    Help,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Parses the arguments (without the program name).
///
/// # Errors
/// `InvalidInput` naming the bad or missing argument.
///
/// ```
/// use nbd_server::args::{parse, Command};
/// let Command::Serve(cfg) = parse(["-r", "-t", "2", "--bind", "127.0.0.1:0", "disk.raw"])? else {
///     unreachable!()
/// };
/// assert!(cfg.read_only);
/// assert_eq!(cfg.iothreads, 2);
/// assert_eq!(cfg.tcp.unwrap().port(), 0);
/// assert!(parse(["--iothreads", "zero", "disk.raw"]).is_err());
/// let Command::Serve(cfg) = parse(["--max-memory", "1G", "--idle-timeout", "0", "disk.raw"])? else {
///     unreachable!()
/// };
/// assert_eq!(cfg.max_memory, 1 << 30);
/// assert_eq!(cfg.idle_timeout, None);
/// assert!(parse(["--max-memory", "1M", "disk.raw"]).is_err(), "below the 64M floor");
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn parse<I, S>(args: I) -> io::Result<Command>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut it = args.into_iter().map(Into::into);
    let mut cfg = Config::new("");
    let mut path = None;
    let mut bind: Option<SocketAddr> = None;
    let mut unix = None;
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| bad(format!("{name} needs a value")))
        };
        match a.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-b" | "--bind" => {
                let v = value(&a)?;
                bind = Some(v.parse().map_err(|e| bad(format!("--bind {v}: {e}")))?);
            }
            "-k" | "--socket" => unix = Some(value(&a)?.into()),
            "-x" | "--export-name" => cfg.export_name = value(&a)?,
            "-D" | "--description" => cfg.description = value(&a)?,
            "-r" | "--read-only" => cfg.read_only = true,
            "-t" | "--iothreads" => {
                let v = value(&a)?;
                cfg.iothreads = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(format!("--iothreads {v}: want a number above 0")))?;
            }
            "--backend" => cfg.backend = value(&a)?.parse()?,
            "--handshake-limit" => cfg.handshake_limit = seconds(&a, &value(&a)?)?,
            "--idle-timeout" => cfg.idle_timeout = seconds(&a, &value(&a)?)?,
            "--max-memory" => {
                let v = value(&a)?;
                cfg.max_memory = size(&v)
                    .filter(|&n| n >= crate::MIN_MAX_MEMORY)
                    .ok_or_else(|| bad(format!("--max-memory {v}: want a size of 64M or more")))?;
            }
            "--max-connections" => {
                let v = value(&a)?;
                cfg.max_connections =
                    Some(v.parse().ok().filter(|&n: &usize| n > 0).ok_or_else(|| {
                        bad(format!("--max-connections {v}: want a number above 0"))
                    })?);
            }
            "--socket-io" => {
                let v = value(&a)?;
                cfg.socket_io = match v.as_str() {
                    "completion" => reactor::net::SocketIo::Completion,
                    "readiness" => reactor::net::SocketIo::Readiness,
                    _ => {
                        return Err(bad(format!(
                            "--socket-io {v}: want completion or readiness"
                        )));
                    }
                };
            }
            "--poll-max-ns" => {
                let v = value(&a)?;
                let ns: u64 = v
                    .parse()
                    .map_err(|e| bad(format!("--poll-max-ns {v}: {e}")))?;
                cfg.poll = PollParams {
                    max: Duration::from_nanos(ns),
                    ..PollParams::IOTHREAD
                };
            }
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(bad(format!("unknown option {s} (see --help)")));
            }
            _ if path.is_some() => return Err(bad(format!("unexpected argument {a}"))),
            _ => path = Some(a),
        }
    }
    cfg.path = path
        .ok_or_else(|| bad("the file to export is missing (see --help)"))?
        .into();
    cfg.tcp = match (bind, &unix) {
        (Some(b), _) => Some(b),
        (None, Some(_)) => None,
        (None, None) => cfg.tcp,
    };
    cfg.unix = unix;
    Ok(Command::Serve(cfg))
}

/// Seconds (fractions allowed) for option `name`; 0 is `None` (no limit).
fn seconds(name: &str, v: &str) -> io::Result<Option<Duration>> {
    let secs: f64 = v
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s < 1e9)
        .ok_or_else(|| bad(format!("{name} {v}: want seconds, 0 or more")))?;
    Ok((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
}

/// A byte count with an optional K, M or G suffix (powers of 1024).
fn size(v: &str) -> Option<usize> {
    let (digits, shift) = match v.as_bytes().last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 10),
        b'm' | b'M' => (&v[..v.len() - 1], 20),
        b'g' | b'G' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    digits.parse::<usize>().ok()?.checked_mul(1 << shift)
}

/// The whole `nbd-server` program: parses `args` (without the program name), serves until
/// SIGINT or SIGTERM, and returns the exit status (2 for a bad command line, 1 when the
/// server cannot start). The binary is this function; the bench runs it too (in a child
/// process of its own), so the figures are the binary's.
pub fn main(args: impl IntoIterator<Item = String>) -> std::process::ExitCode {
    use std::io::Write;
    use std::process::ExitCode;
    let cfg = match parse(args) {
        Ok(Command::Serve(cfg)) => cfg,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("nbd-server: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    crate::tune_allocator();
    // Block SIGINT and SIGTERM before any thread starts, so every thread inherits the mask
    // and this thread alone takes them, with sigwait.
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on this thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let server = match Server::start(cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nbd-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        if let Some(a) = server.tcp_addr() {
            let _ = writeln!(out, "nbd-server: listening on tcp {a}");
        }
        if let Some(p) = server.unix_path() {
            let _ = writeln!(out, "nbd-server: listening on unix {}", p.display());
        }
        let _ = out.flush();
    }
    let mut sig = 0;
    // SAFETY: `set` is a valid signal set and `sig` a valid out-pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    let stats = server.shutdown();
    tracing::info!(?stats, "nbd-server: stopped");
    ExitCode::SUCCESS
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
        match parse(a.iter().copied()).unwrap() {
            Command::Serve(c) => c,
            Command::Help => panic!("help"),
        }
    }

    #[test]
    fn defaults_and_listeners() {
        let c = serve(&["disk"]);
        assert_eq!(c.tcp, Some("127.0.0.1:10809".parse().unwrap()));
        assert_eq!((c.unix, c.iothreads, c.read_only), (None, 1, false));
        assert_eq!(c.poll, PollParams::OFF, "polling is off unless asked for");
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
        assert_eq!(c.export_name, "d");
        assert_eq!(c.handshake_limit, Some(Duration::from_secs(10)));
        let c = serve(&["--handshake-limit", "0", "disk"]);
        assert_eq!(c.handshake_limit, None);
        let c = serve(&["--handshake-limit", "0.5", "disk"]);
        assert_eq!(c.handshake_limit, Some(Duration::from_millis(500)));
        let c = serve(&["--poll-max-ns", "32768", "disk"]);
        assert_eq!(c.poll.max, Duration::from_nanos(32768));
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
            (&["disk", "extra"][..], "extra"),
            (&[][..], "missing"),
            (&["disk", "-x"][..], "-x needs a value"),
        ] {
            let e = parse(args.iter().copied()).unwrap_err();
            assert!(e.to_string().contains(what), "{args:?}: {e}");
        }
        assert!(matches!(parse(["-h"]).unwrap(), Command::Help));
    }
}
