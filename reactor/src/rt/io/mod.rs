//! Asynchronous I/O: owned buffers and fd readiness ([`Async`]).

mod async_fd;
mod buf;
mod write_all;

pub use async_fd::{Async, Readable, Writable};
pub use buf::{AlignedBuf, IoBuf, IoBufMut, Slice};
pub(crate) use write_all::write_all;

/// An `io::Error` for "no reactor is running on this thread".
pub(crate) fn no_reactor() -> std::io::Error {
    std::io::Error::other(
        "no reactor is polling on this thread: use this inside a task or block_on",
    )
}
