//! When the IoThreads busy-poll: while their clients wait on round trips.
//!
//! A client with one request in flight (queue depth 1) sends its next request only after the
//! reply has reached it, and every microsecond the server takes to notice that request is
//! the client's. Waking a halted CPU costs tens of microseconds on a VM, so a spin pays
//! there: on the 2-vCPU bench VM, 200 µs of polling took `qemu-img bench` at QD1 from about
//! 10–15k to 27–33k requests/s, reads and writes alike. The IoThread then spins for most of
//! the time between requests: its CPU per request stays about the same (29–36 µs against
//! 27–35 µs), but it is spent whether or not the next request comes in time.
//!
//! A client with a deep queue keeps the server busy with the requests it has already sent,
//! and a spin between its batches only buys throughput with CPU: at QD32, polling always
//! (200 µs) added 1.5–3.2 µs of server CPU to each read (4.7–5.2 → 6.2–8.4 µs) and 1.1–1.9 µs
//! to each write (6.9–8.5 → 8.8–9.7 µs) in three bench runs (64 µs, standalone: reads
//! 5.1–5.2 → 5.4–6.0 µs, writes 5.7–6.9 → 7.6–8.0 µs). So an IoThread stops polling when a request is admitted with more than
//! [`Config::poll_depth`](crate::Config::poll_depth) requests of its connection unanswered
//! (admitted, and their reply not yet sent: the depth of the client's queue as the server
//! sees it; a request served at once still counts until its reply is sent), and polls again once [`CALM`] requests in a row, over all its connections, were admitted
//! at most that deep. The pause is the IoThread's: a deep client pauses it for the shallow
//! clients it serves too. [`ExportStats::polling_pauses`](crate::ExportStats::polling_pauses)
//! counts the pauses.
//!
//! The server owns its IoThreads' polling: a pause sets it off, and the end of a pause sets
//! it back to [`Config::poll`](crate::Config::poll).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use reactor::{PollParams, Reactor};

/// The default of [`Config::poll_depth`](crate::Config::poll_depth).
pub const DEFAULT_POLL_DEPTH: usize = 2;

/// Requests in a row, over an IoThread's connections, admitted at most
/// [`Config::poll_depth`](crate::Config::poll_depth) deep before a paused IoThread polls
/// again.
pub const CALM: u32 = 64;

thread_local! {
    /// This IoThread's polling is paused (set only while a reactor is current).
    static PAUSED: Cell<bool> = const { Cell::new(false) };
    /// Requests admitted shallow in a row on this IoThread since the last deep one.
    static CALM_SO_FAR: Cell<u32> = const { Cell::new(0) };
}

/// How the IoThreads poll: up to `params`, while no connection has more than `depth`
/// requests unanswered (`depth` 0: at any depth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) params: PollParams,
    pub(crate) depth: usize,
}

impl Policy {
    /// A request was admitted on the current IoThread with `in_flight` requests of its
    /// connection unanswered, itself included. `pauses` counts the pauses this starts.
    pub(crate) fn admitted(&self, in_flight: usize, pauses: &AtomicU64) {
        if self.depth == 0 || self.params.max.is_zero() {
            return;
        }
        if in_flight > self.depth {
            CALM_SO_FAR.with(|c| c.set(0));
            if !PAUSED.with(Cell::get)
                && Reactor::with_current(|r| r.set_poll(PollParams::OFF)).is_some()
            {
                PAUSED.with(|p| p.set(true));
                // Relaxed: a statistics counter.
                pauses.fetch_add(1, Ordering::Relaxed);
            }
        } else if PAUSED.with(Cell::get) {
            let calm = CALM_SO_FAR.with(|c| {
                c.set(c.get().saturating_add(1));
                c.get()
            });
            if calm >= CALM && Reactor::with_current(|r| r.set_poll(self.params)).is_some() {
                PAUSED.with(|p| p.set(false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_backends as backends;
    use reactor::Backend;
    use std::time::Duration;

    /// A reactor on `backend` polling up to [`POLL`].
    fn polling_reactor(backend: Backend) -> Reactor {
        Reactor::builder()
            .backend(backend)
            .poll(POLL)
            .build()
            .unwrap()
    }

    /// Runs `f` with `r` current, as a connection's code runs.
    fn inside(r: &Reactor, f: impl FnOnce()) {
        r.block_on(async { f() });
    }

    const POLL: PollParams = PollParams {
        max: Duration::from_micros(200),
        grow: 2,
        shrink: 0,
    };

    #[test]
    fn a_deep_request_pauses_the_threads_polling_until_enough_shallow_ones_follow() {
        for backend in backends() {
            let r = polling_reactor(backend);
            inside(&r, || {
                let pauses = AtomicU64::new(0);
                let policy = Policy {
                    params: POLL,
                    depth: 2,
                };
                policy.admitted(1, &pauses);
                policy.admitted(2, &pauses);
                assert_eq!(
                    r.poll_params(),
                    POLL,
                    "{backend}: shallow requests leave it on"
                );
                policy.admitted(3, &pauses);
                assert_eq!(r.poll_params(), PollParams::OFF, "{backend}");
                policy.admitted(8, &pauses);
                assert_eq!(pauses.load(Ordering::Relaxed), 1, "{backend}: one pause");
                for _ in 0..CALM - 1 {
                    policy.admitted(1, &pauses);
                }
                policy.admitted(3, &pauses); // deep again: the count starts over
                for _ in 0..CALM - 1 {
                    policy.admitted(2, &pauses);
                }
                assert_eq!(
                    r.poll_params(),
                    PollParams::OFF,
                    "{backend}: one short of calm"
                );
                policy.admitted(1, &pauses);
                assert_eq!(r.poll_params(), POLL, "{backend}: calm again");
                policy.admitted(5, &pauses);
                assert_eq!(r.poll_params(), PollParams::OFF, "{backend}");
                assert_eq!(pauses.load(Ordering::Relaxed), 2, "{backend}");
                for _ in 0..CALM {
                    policy.admitted(1, &pauses);
                }
                assert_eq!(r.poll_params(), POLL, "{backend}");
            });
        }
    }

    #[test]
    fn depth_zero_no_polling_or_no_reactor_leave_the_thread_alone() {
        let pauses = AtomicU64::new(0);
        let policy = Policy {
            params: POLL,
            depth: 2,
        };
        // Outside a reactor there is nothing to pause, and nothing is counted.
        policy.admitted(32, &pauses);
        assert!(!PAUSED.with(Cell::get));
        for backend in backends() {
            let r = polling_reactor(backend);
            inside(&r, || {
                let any = Policy {
                    params: POLL,
                    depth: 0,
                };
                any.admitted(32, &pauses);
                assert_eq!(
                    r.poll_params(),
                    POLL,
                    "{backend}: depth 0 polls at any depth"
                );
                r.set_poll(PollParams::OFF);
                let off = Policy {
                    params: PollParams::OFF,
                    depth: 2,
                };
                off.admitted(32, &pauses);
                assert_eq!(r.poll_params(), PollParams::OFF, "{backend}");
            });
        }
        assert_eq!(pauses.load(Ordering::Relaxed), 0);
    }
}
