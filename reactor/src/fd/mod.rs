//! fds and the backend: the one place that knows which fd monitors exist (`backend.rs`, the
//! only feature `cfg`s of the crate), the level-triggered fd handlers with their read, write
//! and poll callbacks (`handlers.rs`, [`Interest`](crate::Interest)), and the completions of
//! io_uring operations on the loop's own ring (`ops.rs`). Callbacks run with `&Reactor`; the
//! backends themselves (`fdmon-epoll`, `fdmon-uring`) know nothing of the reactor.

pub(crate) mod backend;
pub(crate) mod buf_ring;
pub(crate) mod handlers;
pub(crate) mod interest;
pub(crate) mod ops;
