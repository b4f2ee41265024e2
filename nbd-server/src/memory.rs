//! Memory the server gives back after a burst of connections, and the load it can report.
//!
//! What a connection allocates is freed when it closes, but glibc's allocator keeps freed
//! memory in the middle of its heaps (it only returns the top of a heap to the system). After
//! thousands of connections at once, the IoThreads' heaps hold hundreds of MB of free memory,
//! and a later burst, laid out differently over it, grows them further: measured before this,
//! 3,000 connections made RSS 64, 122 and 179 MB after three rounds. So once the number of
//! connections has fallen to half its peak or less (and the peak was a burst:
//! [`BURST`] connections or more), the accept thread waits [`QUIET`] for the closing
//! connections' last tasks to go, and gives the free memory back ([`trim_allocator`]).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The least peak of connections whose fall makes the server give memory back.
pub const BURST: usize = 64;
/// How long the accept thread waits after the fall before it gives memory back.
pub const QUIET: Duration = Duration::from_millis(500);

/// Gives the allocator's free memory back to the system (`malloc_trim(0)` on glibc, every
/// arena); whether any was. Elsewhere than glibc it does nothing and returns `false`. Safe to
/// call at any time from any thread; it takes each arena's lock in turn, so allocations on
/// other threads wait while it runs (milliseconds for hundreds of MB).
///
/// ```
/// // After freeing a lot of memory:
/// let v: Vec<Vec<u8>> = (0..1000).map(|_| vec![1u8; 10_000]).collect();
/// drop(v);
/// let _released: bool = nbd_server::trim_allocator();
/// ```
pub fn trim_allocator() -> bool {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0) == 1
    }
    #[cfg(not(target_env = "gnu"))]
    false
}

/// The number of connections served, and its peak since memory was last given back.
#[derive(Default)]
pub(crate) struct Connections {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Connections {
    /// Takes a connection slot unless `max` are taken; the count before.
    pub(crate) fn enter(&self, max: usize) -> Option<usize> {
        // Relaxed: counts checked against limits; nothing else is published through them.
        let n = self.now.fetch_add(1, Ordering::Relaxed);
        if n >= max {
            self.now.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        // Relaxed: as above.
        self.peak.fetch_max(n + 1, Ordering::Relaxed);
        Some(n)
    }

    /// Gives a slot back.
    pub(crate) fn leave(&self) {
        // Relaxed: as in `enter`.
        self.now.fetch_sub(1, Ordering::Relaxed);
    }

    /// Connections served now.
    pub(crate) fn now(&self) -> usize {
        // Relaxed: as in `enter`.
        self.now.load(Ordering::Relaxed)
    }

    /// Whether the count has fallen from a burst to half of it or less.
    fn fell(&self) -> bool {
        // Relaxed: as in `enter`.
        let peak = self.peak.load(Ordering::Relaxed);
        peak >= BURST && self.now() <= peak / 2
    }

    /// Memory was given back: the peak starts again from now.
    fn reset_peak(&self) {
        // Relaxed: as in `enter`; a connection counted meanwhile raises it again.
        self.peak.store(self.now(), Ordering::Relaxed);
    }
}

/// The accept thread's task: gives memory back after each fall from a burst. `closed` waits
/// (at most its argument) for a connection to close.
pub(crate) async fn give_back<F, W>(conns: Arc<Connections>, closed: W)
where
    W: Fn(Duration) -> F,
    F: std::future::Future<Output = ()>,
{
    loop {
        closed(Duration::from_secs(1)).await;
        if !conns.fell() {
            continue;
        }
        reactor::time::sleep(QUIET).await;
        if conns.fell() {
            let released = trim_allocator();
            tracing::debug!(
                connections = conns.now(),
                released,
                "nbd: memory given back after a burst of connections"
            );
            conns.reset_peak();
        }
    }
}

/// What one IoThread holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadLoad {
    /// Its reactor's live tasks, BHs and timers ([`reactor::Reactor::bh_count`]).
    pub tasks: usize,
    /// Its reactor's fd registrations ([`reactor::Reactor::fd_count`]).
    pub fds: usize,
    /// Its reactor's io_uring operations in flight ([`reactor::Reactor::ops_in_flight`]).
    pub ops_in_flight: usize,
}

/// What a server holds now ([`Server::load`](crate::Server::load)): after its connections
/// close, it comes back to what it was before they came. `nbd-server` prints it on `SIGUSR1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// Connections served (from accept to close).
    pub connections: usize,
    /// Each IoThread's, in order.
    pub iothreads: Vec<ThreadLoad>,
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connections {}", self.connections)?;
        for (i, t) in self.iothreads.iter().enumerate() {
            write!(
                f,
                "; iothread {i}: tasks {} fds {} ops {}",
                t.tasks, t.fds, t.ops_in_flight
            )?;
        }
        Ok(())
    }
}

/// Asks each IoThread (through its handle) for its load, waiting at most a second for each.
pub(crate) fn load_of(workers: &[reactor::Handle], connections: usize) -> io::Result<Load> {
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, h) in workers.iter().enumerate() {
        let tx = tx.clone();
        h.oneshot(move |r| {
            let _ = tx.send((
                i,
                ThreadLoad {
                    tasks: r.bh_count(),
                    fds: r.fd_count(),
                    ops_in_flight: r.ops_in_flight(),
                },
            ));
        })
        .map_err(|_| io::Error::other(format!("nbd-server: IoThread {i} has stopped")))?;
    }
    drop(tx);
    let mut iothreads = vec![None; workers.len()];
    for _ in 0..workers.len() {
        let (i, t) = rx.recv_timeout(Duration::from_secs(1)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "nbd-server: an IoThread did not report its load within 1 s",
            )
        })?;
        iothreads[i] = Some(t);
    }
    Ok(Load {
        connections,
        iothreads: iothreads
            .into_iter()
            .map(|t| t.expect("each reported"))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fall_from_a_burst_to_half_of_it_calls_for_memory_back() {
        let c = Connections::default();
        for _ in 0..BURST {
            assert!(c.enter(usize::MAX).is_some());
        }
        assert!(!c.fell(), "at the peak");
        for _ in 0..BURST / 2 - 1 {
            c.leave();
        }
        assert!(!c.fell(), "above half the peak");
        c.leave();
        assert!(c.fell(), "at half the peak");
        c.reset_peak();
        assert!(!c.fell(), "the peak starts again");
    }

    #[test]
    fn a_small_peak_is_no_burst_and_the_limit_holds() {
        let c = Connections::default();
        assert_eq!(c.enter(2), Some(0));
        assert_eq!(c.enter(2), Some(1));
        assert_eq!(c.enter(2), None, "over the limit");
        c.leave();
        c.leave();
        assert!(!c.fell(), "two connections are no burst");
        assert_eq!(c.now(), 0);
    }
}
