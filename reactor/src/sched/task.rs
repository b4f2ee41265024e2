//! Tasks: futures run by the reactor, where a wake is a BH schedule.
//!
//! A task is a BH node with the `TASK` flag whose callback is the task's future. Its waker is
//! the node itself: waking schedules the node (SP1–SP4 of the notification protocol), so waking
//! a task of a busy reactor from any thread costs no system call, and tasks woken in one
//! iteration run in FIFO order in the next one. A task is polled at most once per wake, never
//! re-entrantly, and only on its reactor's thread.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use crate::event_loop::Reactor;
use crate::lockfree::sync::{Arc, AtomicBool, Ordering};
use crate::sched::bh::{BhNode, Callback, Kind, SCHEDULED};
use crate::sched::handle::Closed;

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone_waker, wake, wake_by_ref, drop_waker);

// SAFETY (all four): the data pointer of a task waker is a `*const BhNode` that came from an
// `Arc<BhNode>`, and every owned waker holds one strong reference to it.
unsafe fn clone_waker(p: *const ()) -> RawWaker {
    // SAFETY: see above; the clone takes its own reference.
    unsafe { Arc::increment_strong_count(p.cast::<BhNode>()) };
    RawWaker::new(p, &VTABLE)
}

unsafe fn wake(p: *const ()) {
    // SAFETY: see above; consumes the waker's reference after scheduling.
    let node = unsafe { Arc::from_raw(p.cast::<BhNode>()) };
    node.enqueue(SCHEDULED);
}

unsafe fn wake_by_ref(p: *const ()) {
    // SAFETY: see above; the waker's reference keeps the node alive.
    unsafe { &*p.cast::<BhNode>() }.enqueue(SCHEDULED);
}

unsafe fn drop_waker(p: *const ()) {
    // SAFETY: see above; gives back the waker's reference.
    drop(unsafe { Arc::from_raw(p.cast::<BhNode>()) });
}

/// A waker for `node` that borrows the caller's reference: no reference-count traffic unless
/// the future clones it.
pub(crate) fn waker_ref(node: &BhNode) -> ManuallyDrop<Waker> {
    let raw = RawWaker::new(std::ptr::from_ref(node).cast(), &VTABLE);
    // SAFETY: the vtable's contract holds (the node lives in an `Arc`), and `ManuallyDrop`
    // keeps this borrowed waker from giving back a reference it does not own.
    ManuallyDrop::new(unsafe { Waker::from_raw(raw) })
}

/// An owned waker for `node`.
pub(crate) fn waker(node: &Arc<BhNode>) -> Waker {
    (*waker_ref(node)).clone()
}

/// Why a task did not produce its output.
pub enum JoinError {
    /// It was aborted, or its reactor was dropped before it finished.
    Cancelled,
    /// It panicked; the payload is the panic's.
    Panic(Box<dyn Any + Send + 'static>),
}

impl JoinError {
    /// Whether the task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, JoinError::Cancelled)
    }

    /// Whether the task panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self, JoinError::Panic(_))
    }

    /// The panic payload, if the task panicked (resume it with `std::panic::resume_unwind`).
    pub fn into_panic(self) -> Option<Box<dyn Any + Send + 'static>> {
        match self {
            JoinError::Panic(p) => Some(p),
            JoinError::Cancelled => None,
        }
    }
}

impl fmt::Debug for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::Cancelled => f.write_str("JoinError::Cancelled"),
            JoinError::Panic(p) => write!(f, "JoinError::Panic({:?})", panic_message(&**p)),
        }
    }
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::Cancelled => f.write_str("task was cancelled"),
            JoinError::Panic(p) => write!(f, "task panicked: {}", panic_message(&**p)),
        }
    }
}

impl std::error::Error for JoinError {}

fn panic_message(p: &(dyn Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string payload)")
}

enum JoinState<T> {
    Running(Option<Waker>),
    Done(Result<T, JoinError>),
    Taken,
}

/// What a task and its [`JoinHandle`] share.
struct Join<T> {
    state: Mutex<JoinState<T>>,
    aborted: AtomicBool,
}

impl<T> Join<T> {
    fn finish(&self, result: Result<T, JoinError>) {
        let waker = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match std::mem::replace(&mut *st, JoinState::Done(result)) {
                JoinState::Running(w) => w,
                other => {
                    *st = other; // already finished: keep the first outcome
                    None
                }
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The future a task node polls: the user's future, plus the bookkeeping of its outcome.
struct TaskFut<F: Future> {
    fut: Option<F>,
    join: Arc<Join<F::Output>>,
}

impl<F: Future> Future for TaskFut<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `fut` is never moved out while pinned: it is polled in place and dropped in
        // place (set to `None`); `join` is not structurally pinned.
        let this = unsafe { self.get_unchecked_mut() };
        // Acquire: pairs with the release store in `JoinHandle::abort`.
        if this.join.aborted.load(Ordering::Acquire) {
            this.fut = None;
            this.join.finish(Err(JoinError::Cancelled));
            return Poll::Ready(());
        }
        let Some(fut) = this.fut.as_mut() else {
            return Poll::Ready(());
        };
        // SAFETY: see above: `fut` stays where it is until dropped in place.
        let fut = unsafe { Pin::new_unchecked(fut) };
        match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => {
                this.fut = None;
                this.join.finish(Ok(v));
                Poll::Ready(())
            }
            Err(payload) => {
                this.fut = None;
                this.join.finish(Err(JoinError::Panic(payload)));
                Poll::Ready(())
            }
        }
    }
}

impl<F: Future> Drop for TaskFut<F> {
    fn drop(&mut self) {
        if self.fut.is_some() {
            // Dropped unfinished: the reactor went away. The future goes first, then the
            // `JoinHandle` learns.
            self.fut = None;
            self.join.finish(Err(JoinError::Cancelled));
        }
    }
}

/// Creates a task node for `fut` (not registered, not scheduled) and its handle.
fn new_task<F>(
    r_shared: &Arc<crate::event_loop::Remote>,
    fut: F,
) -> (Arc<BhNode>, JoinHandle<F::Output>)
where
    F: Future + 'static,
{
    let join = Arc::new(Join {
        state: Mutex::new(JoinState::Running(None)),
        aborted: AtomicBool::new(false),
    });
    let task = TaskFut {
        fut: Some(fut),
        join: join.clone(),
    };
    let node = BhNode::new(r_shared, Kind::Task, Callback::Task(Box::pin(task)));
    (node.clone(), JoinHandle { join, node })
}

impl Reactor {
    /// Spawns a task on this reactor; `fut` need not be `Send`. It is first polled in the next
    /// iteration, then each time it is woken. A panic in the task is caught and reported by
    /// its [`JoinHandle`]; the reactor goes on.
    ///
    /// ```
    /// use reactor::Reactor;
    /// let r = Reactor::new()?;
    /// let rc = std::rc::Rc::new(20); // not Send
    /// let h = r.spawn_local(async move { *rc + 1 });
    /// assert_eq!(r.block_on(h).unwrap(), 21);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn spawn_local<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + 'static,
    {
        let (node, handle) = new_task(&self.shared, fut);
        self.bhs().register(&node);
        node.enqueue(SCHEDULED);
        handle
    }

    /// Runs the reactor until `fut` completes, and returns its output. Tasks, BHs, fd
    /// handlers and timers keep running meanwhile. `fut` is polled on this thread with this
    /// reactor current (so it may spawn and sleep), once at the start and then each time it is
    /// woken. May be nested inside a callback or task, like `poll`.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        let woken = std::rc::Rc::new(std::cell::Cell::new(true));
        let w2 = woken.clone();
        let bh = self.bh(move |_| w2.set(true));
        let waker = waker(bh.node());
        let mut cx = Context::from_waker(&waker);
        let mut fut = std::pin::pin!(fut);
        loop {
            if woken.replace(false) {
                let _enter = self.enter();
                let _budget = self.io_budget().task_poll();
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    return v;
                }
            }
            self.poll(true);
        }
    }
}

impl crate::Handle {
    /// Spawns a `Send` task on the reactor from any thread. It starts in the reactor's next
    /// iteration. Returns `Err(Closed)` (and drops `fut`) if the reactor is gone.
    ///
    /// ```
    /// use reactor::Reactor;
    /// let r = Reactor::new()?;
    /// let h = r.handle();
    /// let jh = std::thread::spawn(move || h.spawn(async { 6 * 7 }).unwrap()).join().unwrap();
    /// assert_eq!(r.block_on(jh).unwrap(), 42);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn spawn<F>(&self, fut: F) -> Result<JoinHandle<F::Output>, Closed>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (node, handle) = new_task(self.shared(), fut);
        // The node carries a `Send` future, so handing it to the home thread is sound.
        let carried = SendNode(node);
        self.oneshot(move |r| {
            let SendNode(node) = carried;
            r.bhs().adopt(&node);
            node.enqueue(SCHEDULED);
        })?;
        Ok(handle)
    }
}

/// A task node whose future is `Send`, on its way to its home thread.
struct SendNode(Arc<BhNode>);
// SAFETY: built only in `Handle::spawn`, whose future and output are `Send`; the node itself is
// Send + Sync.
unsafe impl Send for SendNode {}

/// The handle of a spawned task: await it for the task's output, [`abort`](Self::abort) it,
/// or [`detach`](Self::detach) it (dropping it detaches too: the task runs on).
///
/// Awaiting gives `Err(JoinError::Cancelled)` if the task was aborted or its reactor dropped
/// before it finished, and `Err(JoinError::Panic(_))` if it panicked.
pub struct JoinHandle<T> {
    join: Arc<Join<T>>,
    node: Arc<BhNode>,
}

impl<T> JoinHandle<T> {
    /// Cancels the task: its future is dropped on its reactor's thread at the reactor's next
    /// iteration, unless it finished first. Works from any thread.
    pub fn abort(&self) {
        // Release: pairs with the acquire load in `TaskFut::poll`.
        self.join.aborted.store(true, Ordering::Release);
        self.node.enqueue(SCHEDULED);
    }

    /// Lets the task run on without anyone waiting for it.
    pub fn detach(self) {}

    /// Whether the task has finished (with an output, a panic or a cancellation).
    pub fn is_finished(&self) -> bool {
        !matches!(
            *self.join.state.lock().unwrap_or_else(|e| e.into_inner()),
            JoinState::Running(_)
        )
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, JoinError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.join.state.lock().unwrap_or_else(|e| e.into_inner());
        match std::mem::replace(&mut *st, JoinState::Taken) {
            JoinState::Running(w) => {
                let w = match w {
                    Some(w) if w.will_wake(cx.waker()) => w,
                    _ => cx.waker().clone(),
                };
                *st = JoinState::Running(Some(w));
                Poll::Pending
            }
            JoinState::Done(r) => Poll::Ready(r),
            JoinState::Taken => panic!("JoinHandle polled after it returned its output"),
        }
    }
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// Yields to the reactor once: the task is re-queued behind the tasks and BHs already queued
/// and resumes in a later slice (the loop does not block in between).
///
/// ```
/// let r = reactor::Reactor::new()?;
/// let order = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
/// let o = order.clone();
/// r.block_on(async move {
///     let o2 = o.clone();
///     let other = reactor::Reactor::with_current(|r| r.spawn_local(async move { o2.borrow_mut().push("other") })).unwrap();
///     reactor::yield_now().await;
///     o.borrow_mut().push("after yield");
///     other.await.unwrap();
/// });
/// assert_eq!(*order.borrow(), ["other", "after yield"]);
/// # Ok::<(), std::io::Error>(())
/// ```
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}
