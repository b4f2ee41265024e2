//! [`IoThread`]: a reactor running on a thread of its own.

use std::fmt;
use std::io;
use std::thread;

use crate::event_loop::Builder;
use crate::sched::handle::Handle;

/// A reactor on its own named thread, driven by [`Reactor::run`](crate::Reactor::run).
/// Reach it through [`handle`](Self::handle): spawn `Send` tasks, post one-shots, arm timers.
///
/// Dropping the `IoThread` stops the loop at the end of its current iteration and joins the
/// thread. The reactor is then dropped on its thread, which means: BHs and one-shots still
/// queued are dropped without running, tasks still pending are dropped (their `JoinHandle`s
/// report [`JoinError::Cancelled`](crate::JoinError::Cancelled)), io_uring operations in
/// flight are cancelled and waited for, and later calls on a `Handle` return `Err(Closed)`.
/// Work that must finish should be awaited (or its `JoinHandle` awaited) before the drop.
///
/// ```
/// use reactor::{Builder, IoThread};
/// let io = IoThread::spawn("storage-io", Builder::new())?;
/// let jh = io.handle().spawn(async { 1 + 1 }).unwrap();
/// let r = reactor::Reactor::new()?;
/// assert_eq!(r.block_on(jh).unwrap(), 2);
/// drop(io); // stops and joins
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct IoThread {
    handle: Handle,
    name: String,
    thread: Option<thread::JoinHandle<()>>,
}

impl IoThread {
    /// Starts a thread named `name`, builds the reactor there from `builder`, and runs it.
    ///
    /// # Errors
    /// The thread cannot be started, or the reactor cannot be built (the builder's error).
    pub fn spawn(name: impl Into<String>, builder: Builder) -> io::Result<IoThread> {
        let name = name.into();
        let (tx, rx) = std::sync::mpsc::channel();
        // Adaptive polling is on by default on an IoThread (a bare reactor has it off).
        let builder = if builder.poll_is_default() {
            builder.poll(crate::PollParams::IOTHREAD)
        } else {
            builder
        };
        let thread = thread::Builder::new().name(name.clone()).spawn(move || {
            let r = match builder.build() {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(r.handle()));
            r.run();
        })?;
        match rx.recv() {
            Ok(Ok(handle)) => Ok(IoThread {
                handle,
                name,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(io::Error::other(format!(
                "IoThread {name}: the thread died while starting"
            ))),
        }
    }

    /// The handle of the thread's reactor.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the loop, joins the thread, and reports whether a callback on it panicked.
    pub fn join(mut self) -> thread::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> thread::Result<()> {
        let _ = self.handle.stop();
        match self.thread.take() {
            Some(t) => t.join(),
            None => Ok(()),
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if self.stop_and_join().is_err() {
            tracing::error!(thread = %self.name, "reactor: a callback panicked on the IoThread");
        }
    }
}

impl fmt::Debug for IoThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoThread")
            .field("name", &self.name)
            .finish()
    }
}
