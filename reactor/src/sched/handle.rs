//! [`Handle`]: the `Send + Sync` face of a reactor, for other threads.

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use crate::event_loop::{Reactor, Remote};
use crate::lockfree::sync::{Arc, Ordering};
use crate::sched::bh::{BhNode, Callback, Kind};
use crate::sched::clock::{DISARMED, ns_after};

/// The reactor behind a [`Handle`] has been dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the reactor has been dropped")
    }
}

impl std::error::Error for Closed {}

impl From<Closed> for io::Error {
    fn from(c: Closed) -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, c)
    }
}

/// Queues a one-shot node (`OneShot`, or `OneShotTimer` at `deadline`) on `shared`'s list.
/// If the reactor is gone, the callback is dropped on this thread: for a `Handle` it is
/// `Send`, and for `Reactor::oneshot*` this is the home thread.
pub(crate) fn post_oneshot(
    shared: &Arc<Remote>,
    kind: Kind,
    deadline: u64,
    callback: Callback,
) -> Result<(), Closed> {
    let node = BhNode::new(shared, kind, callback);
    // Relaxed: published with the node by the release push of SP2.
    node.deadline.store(deadline, Ordering::Relaxed);
    BhNode::post(node).map_err(|_| Closed)
}

/// A `Send + Sync + Clone` handle to a [`Reactor`], for other threads: wake it, hand it
/// one-shot work, arm one-shot timers, stop it.
///
/// Every call returns `Err(`[`Closed`]`)` once the reactor has been dropped; nothing panics
/// and nothing runs then. A closure handed over to a dropped reactor is dropped unrun, on the
/// caller's thread. Handles (and [`Bh`](crate::Bh)s and [`Timer`](crate::Timer)s) keep the
/// reactor's eventfd open until the last of them is dropped, so that a late wakeup can never
/// write to a reused fd number.
///
/// Scheduling into a busy reactor costs no system call: the eventfd is written only when the
/// reactor may be asleep ([`Stats::notify_skipped`](crate::Stats::notify_skipped) counts the
/// ones that skipped it).
///
/// ```
/// use reactor::Reactor;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
///
/// let r = Reactor::new()?;
/// let n = Arc::new(AtomicU32::new(0));
/// let (h, n2) = (r.handle(), n.clone());
/// std::thread::spawn(move || {
///     for _ in 0..10 {
///         let n3 = n2.clone();
///         h.oneshot(move |_| { n3.fetch_add(1, Ordering::Relaxed); }).unwrap();
///     }
/// });
/// r.run_until(|| n.load(Ordering::Relaxed) == 10);
/// drop(r);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Remote>,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Handle {
    pub(crate) fn new(shared: Arc<Remote>) -> Handle {
        Handle { shared }
    }

    pub(crate) fn shared(&self) -> &Arc<Remote> {
        &self.shared
    }

    fn check(&self) -> Result<(), Closed> {
        if self.shared.notifier.list.is_closed() {
            Err(Closed)
        } else {
            Ok(())
        }
    }

    /// Whether the reactor has been dropped.
    pub fn is_closed(&self) -> bool {
        self.shared.notifier.list.is_closed()
    }

    /// Wakes the reactor: a blocking `poll` returns (without counting it as progress), and a
    /// `poll` about to block does not block.
    pub fn notify(&self) -> Result<(), Closed> {
        self.shared.notifier.notify().map_err(|_| Closed)
    }

    /// Runs `f` once on the reactor's thread, in its next iteration (counts as progress).
    pub fn oneshot(&self, f: impl FnOnce(&Reactor) + Send + 'static) -> Result<(), Closed> {
        post_oneshot(
            &self.shared,
            Kind::OneShot,
            DISARMED,
            Callback::Once(Box::new(f)),
        )
    }

    /// Runs `f` once on the reactor's thread when `after` has passed.
    pub fn oneshot_after(
        &self,
        after: Duration,
        f: impl FnOnce(&Reactor) + Send + 'static,
    ) -> Result<(), Closed> {
        let deadline = ns_after(self.shared.clock.now_ns(), after);
        post_oneshot(
            &self.shared,
            Kind::OneShotTimer,
            deadline,
            Callback::Once(Box::new(f)),
        )
    }

    /// Runs `f` once on the reactor's thread at `when` (at once if it has passed).
    pub fn oneshot_at(
        &self,
        when: Instant,
        f: impl FnOnce(&Reactor) + Send + 'static,
    ) -> Result<(), Closed> {
        let deadline = self.shared.clock.ns_of(when);
        post_oneshot(
            &self.shared,
            Kind::OneShotTimer,
            deadline,
            Callback::Once(Box::new(f)),
        )
    }

    /// Makes [`Reactor::run`] return after its current iteration (waking it if it sleeps).
    pub fn stop(&self) -> Result<(), Closed> {
        self.check()?;
        // Release: pairs with the acquire swap in `Reactor::run`.
        self.shared.stop.store(true, Ordering::Release);
        self.shared.notifier.notify().map_err(|_| Closed)
    }
}
