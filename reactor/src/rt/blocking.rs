//! [`spawn_blocking`]: a closure on the current reactor's thread pool, as a future whose task
//! is woken (a BH schedule) when the result is ready.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::event_loop::Reactor;
use crate::sched::lane::Lane;
use crate::sched::pool::{Job, Run, ThreadPool};
use crate::sched::task::JoinError;

/// One `spawn_blocking` call: the closure until a pool thread takes it, then its result
/// and the waker of the task awaiting it. The pool's job and the future share this one
/// allocation.
struct BlockingCall<F, T> {
    state: Mutex<State<F, T>>,
}

struct State<F, T> {
    f: Option<F>,
    result: Option<std::thread::Result<T>>,
    waker: Option<Waker>,
}

impl<F, T> Run for BlockingCall<F, T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    fn run(&self) {
        let f = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .f
            .take();
        let Some(f) = f else { return };
        let result = catch_unwind(AssertUnwindSafe(f));
        let waker = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.result = Some(result);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The future's view of a [`BlockingCall`], without the closure's type.
trait Outcome<T>: Send + Sync {
    fn poll_outcome(&self, cx: &mut Context<'_>) -> Poll<std::thread::Result<T>>;
}

impl<F: Send, T: Send> Outcome<T> for BlockingCall<F, T> {
    fn poll_outcome(&self, cx: &mut Context<'_>) -> Poll<std::thread::Result<T>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                match &s.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => s.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

/// The future of [`spawn_blocking`]: the closure's result, or `JoinError::Panic` if it
/// panicked. Dropping it does not stop the closure (a blocking call cannot be interrupted);
/// its result is then dropped on the pool thread.
#[must_use = "futures do nothing unless polled"]
pub struct Blocking<T> {
    shared: Arc<dyn Outcome<T>>,
}

impl<T> Future for Blocking<T> {
    type Output = Result<T, JoinError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.shared
            .poll_outcome(cx)
            .map(|r| r.map_err(JoinError::Panic))
    }
}

/// Runs `f` on the thread pool of the reactor polling on this thread when it is called (the
/// default pool outside a reactor) and returns a future of its result; the awaiting task is
/// woken, by a BH schedule, when it is ready. `f` starts at once, not when the future is first
/// polled.
///
/// ```
/// use reactor::{Reactor, spawn_blocking};
/// let r = Reactor::new()?;
/// let sum = r.block_on(spawn_blocking(|| (1..=10).sum::<u32>())).unwrap();
/// assert_eq!(sum, 55);
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn spawn_blocking<T, F>(f: F) -> Blocking<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let pool = current_pool();
    hand_over(f, |job| pool.execute_job(job))
}

/// [`spawn_blocking`] in `lane`: `f` runs after the lane's earlier jobs and never beside them
/// (the buffered writes of one file, which the kernel would serialise anyway).
pub(crate) fn spawn_blocking_in<T, F>(lane: &Lane, f: F) -> Blocking<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let pool = current_pool();
    hand_over(f, |job| lane.execute(&pool, job))
}

/// The pool of the reactor polling on this thread, else the default pool.
fn current_pool() -> ThreadPool {
    Reactor::with_current(|r| r.thread_pool().clone()).unwrap_or_else(ThreadPool::default_pool)
}

/// Gives `execute` the job that runs `f` and hands its result to the returned future: one
/// allocation for both.
fn hand_over<T, F>(f: F, execute: impl FnOnce(Job)) -> Blocking<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let shared = Arc::new(BlockingCall {
        state: Mutex::new(State {
            f: Some(f),
            result: None,
            waker: None,
        }),
    });
    execute(shared.clone());
    Blocking { shared }
}
