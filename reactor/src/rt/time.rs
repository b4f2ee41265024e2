//! Time for tasks: [`sleep`], [`sleep_until`], [`timeout`] and [`interval`], on the reactor's
//! nanosecond timers.
//!
//! The futures here must be polled on a reactor's thread, inside it (by a task, or by
//! [`Reactor::block_on`](crate::Reactor::block_on)); polling one elsewhere panics with a
//! message that says so. They are `Send`, so `Send` tasks may use them. Dropping a pending
//! one cancels its timer.
//!
//! ```
//! use reactor::{time, Reactor};
//! use std::time::{Duration, Instant};
//!
//! let r = Reactor::new()?;
//! let t0 = Instant::now();
//! r.block_on(time::sleep(Duration::from_millis(2)));
//! assert!(t0.elapsed() >= Duration::from_millis(2));
//! let slow = time::timeout(Duration::from_millis(1), time::sleep(Duration::from_secs(60)));
//! assert!(r.block_on(slow).is_err());
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::event_loop::Reactor;
use crate::lockfree::sync::{Arc, AtomicBool, Ordering};
use crate::sched::timer::Timer;

/// Completes `duration` after it was created.
pub fn sleep(duration: Duration) -> Sleep {
    sleep_until(after(Instant::now(), duration))
}

/// A century: what "later than any instant can say" becomes.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 86400);

/// `t + d`, or a century after `t` where that cannot be represented.
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(FAR_FUTURE))
        .unwrap_or(t)
}

/// Completes at `deadline` (at once if it has passed).
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        armed: None,
    }
}

struct Fired {
    done: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

/// The future of [`sleep`] and [`sleep_until`].
#[must_use = "futures do nothing unless polled"]
pub struct Sleep {
    deadline: Instant,
    armed: Option<(Timer, Arc<Fired>)>,
}

impl Sleep {
    /// The instant it completes at.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the deadline has passed.
    pub fn is_elapsed(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Moves the deadline (also after it has completed, to reuse the future).
    pub fn reset(&mut self, deadline: Instant) {
        self.deadline = deadline;
        if let Some((timer, fired)) = &self.armed {
            // Relaxed: the timer callback and this thread are the same (home) thread.
            fired.done.store(false, Ordering::Relaxed);
            timer.arm_at(deadline);
        }
    }
}

fn outside() -> ! {
    panic!("reactor::time futures must be polled by a task or block_on on a reactor's thread")
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        let (timer, fired) = match &self.armed {
            Some(a) => a,
            None => {
                if Instant::now() >= deadline {
                    return Poll::Ready(());
                }
                let fired = Arc::new(Fired {
                    done: AtomicBool::new(false),
                    waker: Mutex::new(None),
                });
                let f2 = fired.clone();
                let timer = Reactor::with_current(|r| {
                    r.timer(move |_| {
                        // Release: pairs with the acquire load in `poll`.
                        f2.done.store(true, Ordering::Release);
                        let w = f2.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Some(w) = w {
                            w.wake();
                        }
                    })
                })
                .unwrap_or_else(|| outside());
                timer.arm_at(deadline);
                self.armed = Some((timer, fired));
                self.armed.as_ref().expect("just set")
            }
        };
        // Acquire: pairs with the release store in the timer callback.
        if fired.done.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let mut w = fired.waker.lock().unwrap_or_else(|e| e.into_inner());
        match &*w {
            Some(old) if old.will_wake(cx.waker()) => {}
            _ => *w = Some(cx.waker().clone()),
        }
        drop(w);
        debug_assert!(timer.is_armed() || fired.done.load(Ordering::Relaxed));
        Poll::Pending
    }
}

impl fmt::Debug for Sleep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sleep")
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// The error of a [`timeout`] whose deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline has elapsed")
    }
}

impl std::error::Error for Elapsed {}

impl From<Elapsed> for std::io::Error {
    fn from(e: Elapsed) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, e)
    }
}

/// Runs `fut` for at most `duration`: its output, or `Err(Elapsed)` (and `fut` is dropped,
/// which cancels whatever it was doing).
pub fn timeout<F: Future>(duration: Duration, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        sleep: sleep(duration),
    }
}

/// The future of [`timeout`].
#[must_use = "futures do nothing unless polled"]
pub struct Timeout<F> {
    fut: F,
    sleep: Sleep,
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `fut` is structurally pinned (never moved out); `sleep` is `Unpin`.
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: as above.
        if let Poll::Ready(v) = unsafe { Pin::new_unchecked(&mut this.fut) }.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        Pin::new(&mut this.sleep).poll(cx).map(|()| Err(Elapsed))
    }
}

/// Ticks every `period`, the first tick at once. When the consumer falls behind by more than
/// a period, the missed ticks are skipped rather than delivered in a burst. A period too long
/// for an `Instant` to reach (`Duration::MAX`) ticks once and then not for a century.
///
/// # Panics
/// If `period` is zero.
pub fn interval(period: Duration) -> Interval {
    assert!(!period.is_zero(), "interval period must be non-zero");
    let now = Instant::now();
    Interval {
        period,
        next: now,
        sleep: sleep_until(now),
    }
}

/// The ticker of [`interval`].
#[derive(Debug)]
pub struct Interval {
    period: Duration,
    next: Instant,
    sleep: Sleep,
}

impl Interval {
    /// Waits for the next tick and returns its scheduled instant.
    pub async fn tick(&mut self) -> Instant {
        std::future::poll_fn(|cx| self.poll_tick(cx)).await
    }

    /// The poll form of [`tick`](Self::tick).
    pub fn poll_tick(&mut self, cx: &mut Context<'_>) -> Poll<Instant> {
        if Pin::new(&mut self.sleep).poll(cx).is_pending() {
            return Poll::Pending;
        }
        let tick = self.next;
        let now = Instant::now();
        let mut next = after(tick, self.period);
        if next <= now {
            // Skip the ticks that are already late.
            let behind = now.duration_since(tick).as_nanos() / self.period.as_nanos();
            let skip = u32::try_from(behind + 1).unwrap_or(u32::MAX);
            next = after(tick, self.period.checked_mul(skip).unwrap_or(Duration::MAX));
        }
        self.next = next;
        self.sleep.reset(next);
        Poll::Ready(tick)
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }
}
