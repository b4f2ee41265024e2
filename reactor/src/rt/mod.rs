//! The async runtime on top of the loop: owned buffers and readiness (`io`), one type per I/O
//! operation and the drivers that run them on the ring, the thread pool or readiness (`op`),
//! files (`fs`, with registered buffers from `fixed`), sockets (`net`), timers as futures (`time`), [`spawn_blocking`](crate::spawn_blocking)
//! (`blocking`) and [`IoThread`](crate::IoThread). It uses the loop's public surface and the
//! scheduling layer; nothing below it depends on it.

pub(crate) mod blocking;
pub(crate) mod budget;
pub(crate) mod fixed;
pub mod fs;
pub mod io;
pub(crate) mod iothread;
pub mod net;
pub(crate) mod op;
pub mod time;

/// An `io::Error` for "no reactor is running on this thread".
pub(crate) fn no_reactor() -> std::io::Error {
    std::io::Error::other(
        "no reactor is polling on this thread: use this inside a task or block_on",
    )
}
