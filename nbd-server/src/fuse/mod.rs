//! FUSE exports: the image served as one regular file at a mountpoint, next to (and through
//! the same page cache as) the NBD listeners, as `qemu-storage-daemon --export type=fuse`
//! does.
//!
//! - The daemon mounts the export itself (root, `mount(2)` with a `/dev/fuse` fd; no
//!   `fusermount3`) over a regular file, and unmounts it when it stops. A missing mountpoint,
//!   a directory, or one something is mounted on already is a clear error at start.
//! - Two transports ([`Transport`]): classic (`/dev/fuse` read and written through the
//!   reactor's readiness, one clone of the fd per IoThread; both backends) and io_uring
//!   (FUSE over io_uring, Linux 6.14+: ring entries registered with `URING_CMD` from each
//!   IoThread's own ring, which then takes 128-byte SQEs; the uring backend). `Auto` takes
//!   io_uring where the kernel offers it (`/sys/module/fuse/parameters/enable_uring`) and the
//!   reactors run on io_uring, classic otherwise, and logs which.
//! - Every request is served like an NBD one (see `fs.rs`): reads and writes through
//!   `reactor::fs`, FLUSH/FSYNC as `fdatasync`, FALLOCATE (punch hole, zero range,
//!   allocate), LSEEK (`SEEK_DATA`/`SEEK_HOLE` from the image's own holes), STATFS, SETATTR
//!   (mode, owner, times; the size is fixed), INTERRUPT (a request not yet started is
//!   answered `EINTR` without its work); everything else `ENOSYS` (or `ENOTDIR`: the root is
//!   a file). A read-only export is mounted read-only.
//! - Bounded: each classic reader serves at most [`classic::MAX_IN_FLIGHT`] requests at once
//!   and each ring queue [`ring::DEPTH`], each with one buffer of [`MAX_WRITE`] bytes and its
//!   headers; the kernel queues the rest. Nothing a user of the mount does is logged per
//!   request.
//!
//! If the daemon dies, the kernel ends the connection: the mounted file answers `ENOTCONN`
//! until an operator unmounts it (`umount -l MOUNTPOINT`, or `fusermount3 -u`).

pub(crate) mod abi;
pub(crate) mod classic;
pub(crate) mod fs;
pub(crate) mod mount;
pub(crate) mod ring;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use abi::Pod;

/// The largest READ or WRITE one FUSE request carries (the kernel splits larger ones).
pub const MAX_WRITE: usize = 256 * 1024;

/// How long [`FuseExport::stop`] waits for the connection to end after the unmount before
/// it aborts the connection.
pub const UNMOUNT_GRACE: Duration = Duration::from_secs(5);

/// How a FUSE export's requests reach the daemon (`--fuse-transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// io_uring where the kernel offers it and the reactors run on io_uring; classic
    /// otherwise.
    #[default]
    Auto,
    /// FUSE over io_uring (`URING_CMD` on `/dev/fuse`); an error where it cannot run.
    Uring,
    /// `/dev/fuse` reads and writes.
    Classic,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Auto => "auto",
            Transport::Uring => "uring",
            Transport::Classic => "classic",
        })
    }
}

/// Whether the running kernel offers FUSE over io_uring (the module parameter is on).
pub fn kernel_offers_uring() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|s| matches!(s.trim(), "Y" | "1"))
}

/// A mounted FUSE export, served by a server's IoThreads.
#[derive(Debug)]
pub(crate) struct FuseExport {
    mountpoint: PathBuf,
    /// The mount's device number (for an abort through the fuse control file system).
    dev: u64,
    transport: Transport,
    fs: Arc<fs::Fs>,
    /// Classic readers still serving, over every IoThread.
    readers: Arc<AtomicUsize>,
    /// Ring entries still registered.
    entries: Arc<AtomicUsize>,
    mounted: bool,
}

impl FuseExport {
    /// Mounts `export` at `mountpoint`, answers the kernel's INIT, and starts serving on
    /// `workers` (whose reactors take 128-byte SQEs when `transport` may be io_uring) with
    /// the transport `transport` comes to.
    ///
    /// # Errors
    /// The mountpoint's errors (see `mount::check_mountpoint`), `/dev/fuse` or `mount(2)`
    /// failing, no INIT from the kernel within 5 s, `Uring` asked where it cannot run.
    pub(crate) fn start(
        export: Arc<crate::Export>,
        mountpoint: &Path,
        transport: Transport,
        workers: &[reactor::Handle],
        uring_reactors: bool,
    ) -> io::Result<FuseExport> {
        let canonical = mount::check_mountpoint(mountpoint)?;
        let offered = kernel_offers_uring();
        let want_uring = match transport {
            Transport::Classic => false,
            Transport::Auto => offered && uring_reactors,
            Transport::Uring if !uring_reactors => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "--fuse-transport uring needs the io_uring backend",
                ));
            }
            Transport::Uring if !offered => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "--fuse-transport uring: the kernel does not offer FUSE over io_uring \
                     (Linux 6.14+ with CONFIG_FUSE_IO_URING; as root: \
                     echo 1 > /sys/module/fuse/parameters/enable_uring)",
                ));
            }
            Transport::Uring => true,
        };
        let dev = mount::open_dev()?;
        mount::mount(&dev, &canonical, export.read_only())?;
        let fs = Arc::new(fs::Fs::new(export)?);
        let mut me = FuseExport {
            // (Not a stat of the mountpoint: that would wait for the INIT answered below.)
            dev: mount::device_of(&canonical)?,
            mountpoint: canonical,
            transport: Transport::Classic,
            fs,
            readers: Arc::new(AtomicUsize::new(0)),
            entries: Arc::new(AtomicUsize::new(0)),
            mounted: true,
        };
        // From here on, a failure unmounts (the drop).
        let uring = init(&dev, want_uring)?;
        if want_uring && !uring {
            if transport == Transport::Uring {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "--fuse-transport uring: the kernel's INIT did not offer FUSE over io_uring",
                ));
            }
            tracing::info!("fuse: the kernel's INIT did not offer io_uring; classic transport");
        }
        me.transport = if uring {
            Transport::Uring
        } else {
            Transport::Classic
        };
        me.serve(dev, workers, uring)?;
        tracing::info!(
            mountpoint = %me.mountpoint.display(),
            transport = %me.transport,
            "fuse export mounted"
        );
        Ok(me)
    }

    /// Starts the classic readers (one per IoThread, on clones of `dev`) and, with io_uring,
    /// the ring queues.
    fn serve(&mut self, dev: OwnedFd, workers: &[reactor::Handle], uring: bool) -> io::Result<()> {
        let buf_size = MAX_WRITE + 4096;
        // Queue q on IoThread q % n. (Spreading each queue's entries over every IoThread, so
        // that one client thread's requests reach them all, measured the same here: with two
        // CPUs, the client's own CPU is the bound at depth.)
        let queues = if uring { ring::possible_cpus()? } else { 0 };
        for (i, w) in workers.iter().enumerate() {
            let fd = if i == 0 {
                dev.try_clone()?
            } else {
                clone_dev(&dev)?
            };
            let (fs, readers) = (self.fs.clone(), self.readers.clone());
            // Relaxed: a count only waited on; see `stop`.
            readers.fetch_add(1, Ordering::Relaxed);
            let posted = w.oneshot(move |r| {
                r.spawn_local(async move {
                    if let Err(e) = classic::serve(fs, fd, buf_size).await {
                        tracing::error!(error = %e, "fuse: a /dev/fuse reader stopped");
                    }
                    readers.fetch_sub(1, Ordering::Relaxed);
                })
                .detach();
            });
            if posted.is_err() {
                self.readers.fetch_sub(1, Ordering::Relaxed);
            }
        }
        // Queue q on IoThread q % n. (Spreading each queue's entries over every IoThread,
        // so that one client thread's requests reach them all, measured the same here: with
        // two CPUs, the client's own CPU is the bound at depth.)
        for qid in 0..queues {
            let w = &workers[qid % workers.len()];
            let (fs, entries) = (self.fs.clone(), self.entries.clone());
            let fd = dev.try_clone()?;
            let (tx, rx) = std::sync::mpsc::channel();
            let posted = w.oneshot(move |r| {
                let q = ring::QueueSpec {
                    qid: qid as u16,
                    depth: ring::DEPTH,
                    payload_size: MAX_WRITE,
                };
                let _ = tx.send(ring::start_queue(r, fs, fd, q, entries));
            });
            let res = match posted {
                Ok(()) => rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "an IoThread did not answer",
                    ))
                }),
                Err(_) => Err(io::Error::other("an IoThread has stopped")),
            };
            res.map_err(|e| io::Error::new(e.kind(), format!("fuse: ring queue {qid}: {e}")))?;
        }
        Ok(())
    }

    /// The transport the export runs on.
    pub(crate) fn transport(&self) -> Transport {
        self.transport
    }

    /// The mountpoint (canonical).
    pub(crate) fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The export's FUSE counters.
    pub(crate) fn stats(&self) -> &fs::FuseCounters {
        &self.fs.stats
    }

    /// Unmounts and waits for the connection to end (every reader stopped, every ring entry
    /// back): a lazy unmount while users hold the file open, then, after
    /// [`UNMOUNT_GRACE`], an abort of the connection (those users get `ENOTCONN`).
    pub(crate) fn stop(&mut self) {
        if !self.mounted {
            return;
        }
        self.mounted = false;
        match mount::unmount(&self.mountpoint) {
            Ok(false) => {}
            Ok(true) => tracing::info!(
                mountpoint = %self.mountpoint.display(),
                "fuse: the mounted file is still open; unmounted lazily"
            ),
            Err(e) => tracing::warn!(error = %e, "fuse: unmount of {}", self.mountpoint.display()),
        }
        let ended = self.wait_ended(UNMOUNT_GRACE);
        let st = &self.fs.stats;
        // Relaxed: statistics.
        tracing::info!(
            mountpoint = %self.mountpoint.display(),
            requests = st.requests.load(Ordering::Relaxed),
            through_ring = st.ring_requests.load(Ordering::Relaxed),
            errors = st.errors.load(Ordering::Relaxed),
            interrupted = st.interrupted.load(Ordering::Relaxed),
            "fuse export unmounted"
        );
        if !ended {
            if let Err(e) = mount::abort(self.dev) {
                tracing::warn!(error = %e, "fuse: the connection could not be aborted");
            }
            if !self.wait_ended(UNMOUNT_GRACE) {
                tracing::error!("fuse: the connection did not end; its IoThreads stop anyway");
            }
        }
    }

    /// Whether the readers and ring entries are all gone within `limit`.
    fn wait_ended(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            // Relaxed: see `serve`; nothing is read through these counts.
            if self.readers.load(Ordering::Relaxed) == 0
                && self.entries.load(Ordering::Relaxed) == 0
            {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A new fd on the connection of `dev` (`FUSE_DEV_IOC_CLONE`), so that each IoThread reads
/// requests from its own fd.
fn clone_dev(dev: &OwnedFd) -> io::Result<OwnedFd> {
    /// `_IOR(229, 0, uint32_t)`.
    const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;
    let fd = mount::open_dev()?;
    let mut src = dev.as_raw_fd() as u32;
    // SAFETY: the ioctl reads one u32 (the fd to clone) during the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut src) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Answers the kernel's FUSE_INIT on `dev` (waiting up to 5 s for it), asking for io_uring
/// when `want_uring` and the kernel offers it. Returns whether io_uring was agreed.
fn init(dev: &OwnedFd, want_uring: bool) -> io::Result<bool> {
    let mut buf = vec![0u8; abi::MIN_READ_BUFFER.max(MAX_WRITE + 4096)];
    let n = loop {
        let mut pfd = libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, read and written during the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, 5000) };
        if rc == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "fuse: no INIT from the kernel",
            ));
        }
        // SAFETY: reads at most the buffer's length into it.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
            return Err(e);
        }
    };
    let h = abi::InHeader::read(&buf[..n]).ok_or_else(|| io::Error::other("fuse: short INIT"))?;
    let at = std::mem::size_of::<abi::InHeader>();
    if h.opcode != abi::op::INIT {
        return Err(io::Error::other(format!(
            "fuse: the first request was {}, not INIT",
            h.opcode
        )));
    }
    let i = abi::InitIn::read(&buf[at..n]).unwrap_or_default();
    let reply = |error: i32, out: &[u8]| {
        let r = fs::Reply {
            error,
            len: out.len(),
        };
        classic::write_reply(dev, h.unique, r, out);
    };
    if i.major < abi::KERNEL_VERSION || (i.major == 7 && i.minor < 31) {
        reply(libc::EPROTO, &[]);
        return Err(io::Error::other(format!(
            "fuse: the kernel speaks protocol {}.{}; 7.31 or later is needed",
            i.major, i.minor
        )));
    }
    if i.major > abi::KERNEL_VERSION {
        // The kernel asks again with our major.
        let out = abi::InitOut {
            major: abi::KERNEL_VERSION,
            ..Default::default()
        };
        reply(0, out.bytes());
        return init(dev, want_uring);
    }
    let offered = u64::from(i.flags) | u64::from(i.flags2) << 32;
    let mut want = abi::init::ASYNC_READ
        | abi::init::BIG_WRITES
        | abi::init::MAX_PAGES
        | abi::init::ASYNC_DIO
        | abi::init::INIT_EXT
        | abi::init::DIRECT_IO_ALLOW_MMAP;
    if want_uring {
        want |= abi::init::OVER_IO_URING;
    }
    let flags = want & offered;
    let out = abi::InitOut {
        major: abi::KERNEL_VERSION,
        minor: abi::KERNEL_MINOR_VERSION.min(i.minor),
        max_readahead: i.max_readahead,
        flags: flags as u32,
        max_background: 256,
        congestion_threshold: 192,
        max_write: MAX_WRITE as u32,
        time_gran: 1,
        max_pages: (MAX_WRITE / 4096) as u16,
        flags2: (flags >> 32) as u32,
        ..Default::default()
    };
    reply(0, out.bytes());
    Ok(flags & abi::init::OVER_IO_URING != 0)
}
