//! An NBD (Network Block Device) server on the reactor: the kind of storage daemon the
//! reactor is built for, written on its public API only.
//!
//! It exports one file over TCP and/or a Unix socket with the fixed-newstyle handshake
//! (`NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_EXTENDED_HEADERS`, and
//! `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT` with the `base:allocation`
//! context, and `NBD_OPT_STARTTLS`), and serves READ, WRITE, FLUSH, TRIM, WRITE_ZEROES,
//! CACHE, BLOCK_STATUS and DISC, FUA honoured.
//!
//! - TLS ([`tls`], [`Config::tls`]): off, optional or required, with x509 certificates or
//!   pre-shared keys in the files QEMU and nbdkit use, client certificates optionally
//!   verified, and an allow-list of client identities. The handshake runs on the
//!   connection's IoThread like any other socket I/O; what the client negotiated in clear
//!   before `NBD_OPT_STARTTLS` is forgotten after it.
//! - The export goes through the page cache, or around it ([`Cache::None`], `O_DIRECT`): then
//!   every read and write is aligned, through io_uring on the uring backend, and unaligned
//!   requests are served by read-modify-write under range locks.
//!
//! - The export can also be served as a file over FUSE ([`fuse`], [`Config::fuse`]), mounted
//!   by the daemon over a regular file: classic `/dev/fuse` on both backends, FUSE over
//!   io_uring on the uring backend; NBD and the mount share the image and its page cache.
//!
//! - Replies are simple unless the client negotiated structured replies; then READ and
//!   BLOCK_STATUS are answered in chunks (see [`structured`]). With extended headers
//!   (32-byte requests with 64-bit lengths) every reply is chunks. A READ of 64 KiB or more
//!   sends the file's holes as hole chunks (unless it carries `NBD_CMD_FLAG_DF`), and
//!   BLOCK_STATUS reports holes (`HOLE | ZERO`) and data from `SEEK_HOLE`/`SEEK_DATA`, at
//!   most 512 extents per reply. CACHE starts a read-ahead (`POSIX_FADV_WILLNEED`).
//! - Multi-conn (`NBD_FLAG_CAN_MULTI_CONN`): every connection serves the one file through
//!   the one page cache, so a write acknowledged on one connection is read by all, and a
//!   FLUSH (or FUA) on any connection is an `fdatasync` of the file that makes every
//!   acknowledged write durable, whichever connection sent it.
//!
//! - Each connection lives on one IoThread (connections are spread round robin). Its
//!   requests are read in order and served concurrently, up to
//!   [`MAX_IN_FLIGHT`](transmission::MAX_IN_FLIGHT) unfinished at once; one that need not
//!   wait (a cached READ, an inline WRITE) is served by the reader itself, without a task of
//!   its own. Replies go out in completion order, several in one `send` when they are ready
//!   together.
//! - File I/O goes through [`reactor::fs`]: io_uring operations on the uring backend, the
//!   thread pool on epoll. FLUSH and FUA are `fdatasync`; TRIM punches a hole;
//!   WRITE_ZEROES punches a hole (or, with `NO_HOLE`, zeroes the range in place) and falls
//!   back to writing zeros where the file system cannot (or fails fast with `ENOTSUP` for
//!   `FAST_ZERO`).
//! - Errors follow the protocol: a request past the end gets `EINVAL` (READ, TRIM) or
//!   `ENOSPC` (WRITE, WRITE_ZEROES), an unknown command or flag `EINVAL`, a write to a
//!   read-only export `EPERM`; a READ over 32 MiB gets `EINVAL`. A bad request magic or a
//!   WRITE over 32 MiB closes that connection (the stream cannot be trusted), after the
//!   requests in flight finish. Other connections are never affected.
//! - A write is acknowledged only after the kernel accepted all of it (so it survives the
//!   server's death), and with FUA only after `fdatasync` (so it survives the machine's).
//! - No client can take the server's memory, CPU or log: payload bytes in flight are capped
//!   per connection (64 MiB) and server-wide ([`Config::max_memory`]; admission waits, never
//!   fails); a client that leaves its replies unread for [`Config::idle_timeout`] is
//!   disconnected; once a client is gone or stalled, its requests not yet started are
//!   dropped and a READ in flight stops at its next 1 MiB piece; connections beyond
//!   [`Config::max_connections`] are closed at once; `accept` errors back off and resume as
//!   soon as a connection closes; client strings are escaped and cut short in logs, and
//!   repeating conditions are logged at most once per interval; after a burst of
//!   connections falls to half, the allocator's free memory goes back to the system
//!   ([`trim_allocator`]), so rounds of bursts leave RSS where it was ([`Server::load`] shows
//!   the reactors' side coming back too). One exception, by design:
//!   an IoThread busy-polls for up to [`Config::poll`] (200 µs) before each wait while its
//!   clients' queues are shallow, so a client sending a request every few tens of
//!   microseconds keeps it spinning; `--poll-max-ns 0` turns that off.
//!
//! ```no_run
//! use nbd_server::{Config, Server};
//! let mut cfg = Config::new("disk.raw");
//! cfg.unix = Some("/run/disk.sock".into());
//! let server = Server::start(cfg)?;
//! // qemu-img info nbd+unix:///?socket=/run/disk.sock
//! server.wait();
//! # Ok::<(), std::io::Error>(())
//! ```

mod accept;
pub mod activation;
pub mod args;
mod budget;
mod commands;
mod conn;
pub mod daemon;
mod direct;
mod export;
mod extents;
pub mod fuse;
mod handshake;
mod log;
mod memory;
mod meta;
mod polling;

/// The backends this build has, for the unit tests that run on each.
#[cfg(test)]
pub(crate) fn test_backends() -> Vec<reactor::Backend> {
    let mut v = Vec::new();
    if cfg!(feature = "uring") {
        v.push(reactor::Backend::Uring);
    }
    if cfg!(feature = "epoll") {
        v.push(reactor::Backend::Epoll);
    }
    v
}
pub mod proto;
mod read;
mod rules;
mod server;
mod session;
mod stop;
pub mod structured;
pub mod tls;
pub mod transmission;

pub use activation::{Endpoint, Listener, PidFile};
pub use budget::{DEFAULT_MAX_MEMORY, MIN_MAX_MEMORY};
pub use export::{Cache, Export, ExportStats};
pub use memory::{BURST as MEMORY_BURST, Load, QUIET as MEMORY_QUIET, ThreadLoad, trim_allocator};
pub use polling::{CALM as POLL_CALM, DEFAULT_POLL_DEPTH};
pub use server::{
    Config, DEFAULT_HANDSHAKE_LIMIT, DEFAULT_IDLE_TIMEOUT, DEFAULT_POLL, RESERVED_FDS,
    SHUTDOWN_GRACE, Server, Stopper,
};

/// Makes the memory of large buffers go back to the system when they are freed, so that a
/// server's resident memory returns near its baseline after clients with large requests
/// leave. The `nbd-server` program calls it at start; a daemon embedding [`Server`] may too
/// (it changes the allocator for the whole process, so it is the program's choice).
///
/// Why: glibc serves allocations above a threshold with mappings of their own, but raises the
/// threshold to the size of any such block freed (up to 32 MiB); after that, 21–32 MiB reply
/// buffers come from the heap, and their memory stays with the process after the clients
/// leave (measured: 3 GB resident at idle after 48 clients with 21 MiB READs). A fixed
/// threshold of 128 KiB keeps every such buffer mapped on its own (an `munmap` when freed);
/// the connections' pools keep buffers of common sizes for reuse. Measured with the hostile
/// tests: 4–23 MB resident at idle afterwards, from a 3 MB baseline. Elsewhere than glibc it
/// does nothing.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
