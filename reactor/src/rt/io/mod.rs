//! Asynchronous I/O: owned buffers and fd readiness ([`Async`]).

mod async_fd;
mod buf;
mod write_all;

pub use async_fd::{Async, Readable, Writable};
pub use buf::{AlignedBuf, IoBuf, IoBufMut, Slice};
pub(crate) use write_all::write_all;
