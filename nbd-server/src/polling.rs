//! When the IoThreads busy-poll: while their clients wait on round trips.
//!
//! A client with one request in flight (queue depth 1) sends its next request only after the
//! reply has reached it, and every microsecond the server takes to notice that request is
//! the client's. Waking a halted CPU costs tens of microseconds on a VM, so a short spin
//! pays there: on the 2-vCPU bench VM, 64 µs of polling took `qemu-img bench` at QD1 from
//! about 10k to 24–30k requests/s, reads and writes alike.
//!
//! A client with a deep queue keeps the server busy with the requests it has already sent,
//! and a spin between its batches only buys throughput with CPU: at QD32, 64 µs of polling
//! took reads from 5.1–5.2 to 5.4–6.0 µs of server CPU per request, writes from 5.7–6.9 to
//! 7.6–8.0 µs. So an IoThread polls (up to [`Config::poll`](crate::Config::poll)) while none
//! of its connections has more than [`Config::poll_depth`](crate::Config::poll_depth)
//! requests in flight, and stops while one has; such a connection counts again once
//! [`CALM`] requests in a row found at most that many in flight.
//! [`ExportStats::polling_pauses`](crate::ExportStats::polling_pauses) counts the stops.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use reactor::{PollParams, Reactor};

/// The default of [`Config::poll_depth`](crate::Config::poll_depth).
pub const DEFAULT_POLL_DEPTH: usize = 2;

/// Requests in a row admitted at most [`Config::poll_depth`](crate::Config::poll_depth) deep
/// before a deep connection counts as shallow again.
pub const CALM: u32 = 64;

thread_local! {
    /// Deep connections of this IoThread: it polls only while there is none.
    static DEEP: Cell<u32> = const { Cell::new(0) };
}

/// How the IoThreads poll: up to `params`, while no connection has more than `depth`
/// requests in flight (`depth` 0: at any depth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) params: PollParams,
    pub(crate) depth: usize,
}

impl Policy {
    /// Whether the policy ever changes the IoThread's polling.
    fn active(&self) -> bool {
        self.depth > 0 && !self.params.max.is_zero()
    }
}

/// One connection's part in its IoThread's polling. Lives on the IoThread that serves the
/// connection; dropping a deep one counts it out.
#[derive(Debug)]
pub(crate) struct Depth {
    policy: Policy,
    deep: Cell<bool>,
    /// Requests in a row admitted shallow since the connection went deep.
    calm: Cell<u32>,
}

impl Depth {
    pub(crate) fn new(policy: Policy) -> Depth {
        Depth {
            policy,
            deep: Cell::new(false),
            calm: Cell::new(0),
        }
    }

    /// A request was admitted with `in_flight` requests in flight, itself included.
    /// `pauses` counts the times this stops the IoThread's polling.
    pub(crate) fn admitted(&self, in_flight: usize, pauses: &AtomicU64) {
        if !self.policy.active() {
            return;
        }
        if in_flight > self.policy.depth {
            self.calm.set(0);
            if !self.deep.replace(true) && enter() {
                // Relaxed: a statistics counter.
                pauses.fetch_add(1, Ordering::Relaxed);
            }
        } else if self.deep.get() {
            self.calm.set(self.calm.get() + 1);
            if self.calm.get() >= CALM {
                self.deep.set(false);
                leave(self.policy.params);
            }
        }
    }
}

impl Drop for Depth {
    fn drop(&mut self) {
        if self.deep.get() {
            leave(self.policy.params);
        }
    }
}

/// One more deep connection on this thread; returns whether that stopped its polling.
fn enter() -> bool {
    let n = DEEP.with(|d| {
        d.set(d.get() + 1);
        d.get()
    });
    n == 1 && Reactor::with_current(|r| r.set_poll(PollParams::OFF)).is_some()
}

/// One deep connection fewer; the last one gives the thread its polling back.
fn leave(params: PollParams) {
    let n = DEEP.with(|d| {
        d.set(d.get().saturating_sub(1));
        d.get()
    });
    if n == 0 {
        Reactor::with_current(|r| r.set_poll(params));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reactor::Backend;
    use std::time::Duration;

    fn backends() -> Vec<Backend> {
        let mut v = Vec::new();
        if cfg!(feature = "uring") {
            v.push(Backend::Uring);
        }
        if cfg!(feature = "epoll") {
            v.push(Backend::Epoll);
        }
        v
    }

    /// Runs `f` with `r` current, as a connection's code runs.
    fn inside(r: &Reactor, f: impl FnOnce()) {
        r.block_on(async { f() });
    }

    const POLL: PollParams = PollParams {
        max: Duration::from_micros(64),
        grow: 2,
        shrink: 0,
    };

    #[test]
    fn a_deep_connection_stops_its_threads_polling_until_every_one_is_calm_again() {
        for backend in backends() {
            let r = Reactor::builder()
                .backend(backend)
                .poll(POLL)
                .build()
                .unwrap();
            inside(&r, || {
                let pauses = AtomicU64::new(0);
                let policy = Policy {
                    params: POLL,
                    depth: 2,
                };
                let (a, b) = (Depth::new(policy), Depth::new(policy));
                a.admitted(1, &pauses);
                a.admitted(2, &pauses);
                assert_eq!(
                    r.poll_params(),
                    POLL,
                    "{backend}: shallow requests leave it on"
                );
                a.admitted(3, &pauses);
                assert_eq!(r.poll_params(), PollParams::OFF, "{backend}");
                b.admitted(8, &pauses);
                assert_eq!(pauses.load(Ordering::Relaxed), 1, "{backend}: one stop");
                for _ in 0..CALM {
                    a.admitted(1, &pauses);
                }
                assert_eq!(
                    r.poll_params(),
                    PollParams::OFF,
                    "{backend}: b is still deep"
                );
                for _ in 0..CALM - 1 {
                    b.admitted(2, &pauses);
                }
                b.admitted(3, &pauses); // deep again: its streak starts over
                for _ in 0..CALM - 1 {
                    b.admitted(1, &pauses);
                }
                assert_eq!(
                    r.poll_params(),
                    PollParams::OFF,
                    "{backend}: one short of calm"
                );
                b.admitted(1, &pauses);
                assert_eq!(r.poll_params(), POLL, "{backend}: both calm");
                a.admitted(5, &pauses);
                assert_eq!(r.poll_params(), PollParams::OFF, "{backend}");
                drop(a);
                assert_eq!(
                    r.poll_params(),
                    POLL,
                    "{backend}: a deep connection that ends"
                );
                assert_eq!(pauses.load(Ordering::Relaxed), 2, "{backend}");
                assert_eq!(DEEP.with(Cell::get), 0);
            });
        }
    }

    #[test]
    fn depth_zero_or_no_polling_leaves_the_thread_alone() {
        for backend in backends() {
            let r = Reactor::builder()
                .backend(backend)
                .poll(POLL)
                .build()
                .unwrap();
            inside(&r, || {
                let pauses = AtomicU64::new(0);
                let any = Depth::new(Policy {
                    params: POLL,
                    depth: 0,
                });
                any.admitted(32, &pauses);
                assert_eq!(
                    r.poll_params(),
                    POLL,
                    "{backend}: depth 0 polls at any depth"
                );
                r.set_poll(PollParams::OFF);
                let off = Depth::new(Policy {
                    params: PollParams::OFF,
                    depth: 2,
                });
                off.admitted(32, &pauses);
                drop(off);
                assert_eq!(r.poll_params(), PollParams::OFF, "{backend}");
                assert_eq!(pauses.load(Ordering::Relaxed), 0, "{backend}");
            });
        }
    }
}
