//! Home-thread scheduling: bottom halves ([`Bh`](crate::Bh), one-shots), timers
//! ([`Timer`](crate::Timer)), tasks ([`JoinHandle`](crate::JoinHandle), wakers) and the
//! [`Handle`](crate::Handle) other threads reach a reactor through, and the blocking
//! [`ThreadPool`](crate::ThreadPool) a reactor holds. It runs callbacks on the
//! reactor (they take `&Reactor`, as QEMU's take `AioContext *`), and pushes work through the
//! lock-free core; it knows nothing of fds or backends.

pub(crate) mod bh;
pub(crate) mod clock;
pub(crate) mod coop;
pub(crate) mod handle;
pub(crate) mod lane;
pub(crate) mod pool;
pub(crate) mod task;
pub(crate) mod timer;
