//! # reactor
//!
//! An embeddable event loop for storage daemons, modelled on QEMU's `AioContext`: bottom halves
//! (BHs) that any thread can schedule, level-triggered fd handlers, nanosecond timers and nested
//! polls, over io_uring or epoll. A daemon owns one [`Reactor`] per thread; other threads reach
//! it through a [`Handle`] (or a [`Bh`]/[`Timer`], which are `Send + Sync` too).
//!
//! The wakeup protocol is QEMU's `notify_me`/`notified`, with `notified` folded into the BH
//! list's head: while the reactor is busy, scheduling work from another thread makes no system
//! call at all; only a reactor that may be asleep gets its doorbell rung (a ring message or its
//! eventfd). The protocol and its synchronisation points are documented in the
//! source (`lockfree/protocol.rs`).
//!
//! ## Map of the source, by layer (each may call the layers listed after it)
//!
//! - `rt/`: the async runtime: `io` (owned buffers, [`Async`] readiness), `op` (one type per
//!   I/O operation; the drivers that run them on the ring, the thread pool or readiness),
//!   `fs`, `net`, `time`, `blocking` ([`spawn_blocking`]), `iothread` ([`IoThread`]);
//! - `event_loop/`: the loop: `mod.rs` ([`Reactor`], [`Builder`], iteration, fd registration,
//!   SQEs), `embed` (the timerfd of foreign loops), `polling` (adaptive busy polling),
//!   `monitor_errors` (the failure policy), `stats`;
//! - `sched/`: home-thread scheduling: `bh` ([`Bh`]; nodes, queues, one dequeue per kind), `timer` ([`Timer`]), `task` (tasks,
//!   wakers, [`JoinHandle`]), `handle` ([`Handle`]), `pool` ([`ThreadPool`]);
//! - `fd/`: fds and the backend: `backend` (the only place that knows which fd monitors exist),
//!   `handlers` ([`FdHandler`]), `interest` ([`Interest`]), `ops` (completions of SQEs);
//! - `lockfree/`: what other threads touch: `protocol` (BH list and announcement word, flags, `notify_me`;
//!   model-checked), `sync` (the atomics loom replaces), `notify` (the protocol over an
//!   eventfd), `event_notifier` ([`EventNotifier`]);
//! - `sys.rs`: the one errno check of raw system calls.
//!
//! ```
//! use reactor::{FdHandler, Reactor};
//! use std::io::{Read, Write};
//! use std::os::fd::AsRawFd;
//! use std::os::unix::net::UnixStream;
//! use std::{cell::RefCell, rc::Rc};
//!
//! let r = Reactor::new()?; // io_uring, or epoll where io_uring is refused
//! let (a, mut b) = UnixStream::pair()?;
//! a.set_nonblocking(true)?;
//! let got = Rc::new(RefCell::new(Vec::new()));
//! let sink = got.clone();
//! let a_fd = a.as_raw_fd();
//! r.add_fd(a_fd, FdHandler::new().on_read(move |r, id| {
//!     let mut buf = [0u8; 64];
//!     match (&a).read(&mut buf) {
//!         Ok(0) => r.remove_fd(id).unwrap(), // peer closed
//!         Ok(n) => sink.borrow_mut().extend_from_slice(&buf[..n]),
//!         Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
//!     }
//! }))?;
//! let h = r.handle(); // Send + Sync: for other threads
//! std::thread::spawn(move || {
//!     b.write_all(b"hello").unwrap();
//!     drop(b);
//!     h.oneshot(|r| r.stop()).unwrap();
//! });
//! r.run();
//! r.run_until(|| r.fd_count() == 0);
//! assert_eq!(&got.borrow()[..], b"hello");
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! ## Backends
//!
//! Features `uring` and `epoll` (both on by default) build the two fd monitors. With both,
//! [`Backend::Auto`] uses io_uring and falls back to epoll (with a `tracing` warning) when
//! io_uring is refused; the environment variable `REACTOR_BACKEND=uring|epoll` overrides
//! `Auto`, and [`Builder::backend`] forces one. [`Reactor::backend`] says which one runs.

mod event_loop;
mod fd;
mod lockfree;
mod rt;
mod sched;
mod sys;

pub use rt::{fs, io, net, time};

pub use event_loop::polling::{POLL_START, PollParams};
pub use event_loop::stats::Stats;
pub use event_loop::{
    Builder, DEFAULT_MAX_SQES_IN_FLIGHT, DEFAULT_TASK_BUDGET, DEFAULT_URING_ENTRIES, Reactor,
    Wakeup,
};
pub use fd::backend::{BACKEND_ENV, Backend};
pub use fd::handlers::{FdHandler, FdId};
pub use fd::interest::Interest;
pub use fd::ops::{Completion, OpId};
pub use io::{AlignedBuf, Async, IoBuf, IoBufMut};
/// The io_uring crate, for building SQEs for [`Reactor::submit_sqe`].
pub use io_uring;
pub use lockfree::event_notifier::EventNotifier;
pub use rt::blocking::{Blocking, spawn_blocking};
pub use rt::iothread::IoThread;
pub use sched::bh::Bh;
pub use sched::coop::DEFAULT_IO_BUDGET;
pub use sched::handle::{Closed, Handle};
pub use sched::pool::{DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_THREADS, ThreadPool};
pub use sched::task::{JoinError, JoinHandle, yield_now};
pub use sched::timer::Timer;

/// The README's embedding example, compiled and run as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
