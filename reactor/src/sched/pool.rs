//! The blocking thread pool: threads for work that would block the reactor thread (file I/O on
//! the epoll backend, `getaddrinfo`, a slow computation), started on demand up to a maximum and
//! exiting after an idle timeout down to a minimum. It knows nothing of reactors; a reactor
//! holds one, and [`spawn_blocking`](crate::spawn_blocking) hands it work.

use std::collections::VecDeque;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// A job on the pool's queue. Shared (`Arc`) rather than boxed, so that a job can be one
/// allocation with what waits for its result (`spawn_blocking`'s future).
pub(crate) type Job = Arc<dyn Run>;

/// What a pool thread runs. `run` is called once per job.
pub(crate) trait Run: Send + Sync + 'static {
    fn run(&self);
}

/// A plain closure as a job ([`ThreadPool::execute`]).
pub(crate) struct Closure<F>(Mutex<Option<F>>);

impl<F: FnOnce() + Send + 'static> Closure<F> {
    pub(crate) fn job(f: F) -> Job {
        Arc::new(Closure(Mutex::new(Some(f))))
    }
}

impl<F: FnOnce() + Send + 'static> Run for Closure<F> {
    fn run(&self) {
        let f = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = f {
            f();
        }
    }
}

struct State {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
    next_id: usize,
    /// Every `ThreadPool` handle is gone: threads exit once the queue is empty.
    shutdown: bool,
}

struct Inner {
    state: Mutex<State>,
    work: Condvar,
    min: usize,
    max: usize,
    idle_timeout: Duration,
    name: String,
}

/// A pool of threads for blocking work. Cloning it shares the pool.
///
/// ```
/// use reactor::ThreadPool;
/// use std::time::Duration;
/// let pool = ThreadPool::new(0, 4, Duration::from_secs(5));
/// let (tx, rx) = std::sync::mpsc::channel();
/// pool.execute(move || tx.send(2 + 2).unwrap());
/// assert_eq!(rx.recv().unwrap(), 4);
/// ```
#[derive(Clone)]
pub struct ThreadPool {
    inner: Arc<Inner>,
    _owners: Arc<Owners>,
}

/// Shared by the `ThreadPool` handles (not by the threads): when the last handle goes, the
/// threads finish the queue and exit.
struct Owners(Arc<Inner>);

impl Drop for Owners {
    fn drop(&mut self) {
        self.0
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown = true;
        self.0.work.notify_all();
    }
}

impl fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("ThreadPool")
            .field("threads", &st.threads)
            .field("idle", &st.idle)
            .field("queued", &st.queue.len())
            .field("min", &self.inner.min)
            .field("max", &self.inner.max)
            .finish()
    }
}

/// Defaults of the process-wide pool that reactors use unless given their own.
pub const DEFAULT_MAX_THREADS: usize = 64;
/// How long an idle thread of the default pool waits before it exits.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

impl ThreadPool {
    /// A pool that keeps at least `min` threads once started, starts at most `max` (at least
    /// 1), and lets threads above `min` exit after `idle_timeout` without work.
    pub fn new(min: usize, max: usize, idle_timeout: Duration) -> ThreadPool {
        let max = max.max(1);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                threads: 0,
                idle: 0,
                next_id: 0,
                shutdown: false,
            }),
            work: Condvar::new(),
            min: min.min(max),
            max,
            idle_timeout,
            name: "reactor-blocking".into(),
        });
        ThreadPool {
            _owners: Arc::new(Owners(inner.clone())),
            inner,
        }
    }

    /// The process-wide default pool (0 to [`DEFAULT_MAX_THREADS`] threads).
    pub fn default_pool() -> ThreadPool {
        static POOL: OnceLock<ThreadPool> = OnceLock::new();
        POOL.get_or_init(|| ThreadPool::new(0, DEFAULT_MAX_THREADS, DEFAULT_IDLE_TIMEOUT))
            .clone()
    }

    /// Runs `job` on a pool thread. Jobs start in submission order; when all `max` threads are
    /// busy, jobs wait in a queue. If no thread can be started (the process is out of threads)
    /// and none is alive, the calling thread runs the oldest queued job itself, so that no job
    /// waits forever.
    pub fn execute(&self, job: impl FnOnce() + Send + 'static) {
        self.execute_job(Closure::job(job));
    }

    /// [`execute`](Self::execute) for a job already made (no second allocation).
    pub(crate) fn execute_job(&self, job: Job) {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.queue.push_back(job);
        if st.idle > 0 {
            drop(st);
            self.inner.work.notify_one();
        } else if st.threads < self.inner.max {
            st.threads += 1;
            st.next_id += 1;
            let id = st.next_id;
            drop(st);
            self.start_thread(id);
        }
    }

    /// Number of threads alive now.
    pub fn threads(&self) -> usize {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .threads
    }

    /// Jobs not finished yet: queued, or running on a thread (a thread between jobs counts
    /// as running). Zero once every job handed to the pool so far has returned.
    ///
    /// ```
    /// let pool = reactor::ThreadPool::new(0, 2, std::time::Duration::from_secs(1));
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// pool.execute(move || tx.send(()).unwrap());
    /// rx.recv().unwrap();
    /// while pool.pending() > 0 {
    ///     std::thread::yield_now();
    /// }
    /// ```
    pub fn pending(&self) -> usize {
        let st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.queue.len() + (st.threads - st.idle)
    }

    fn start_thread(&self, id: usize) {
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-{id}", inner.name))
            .spawn(move || worker(&inner));
        if let Err(e) = spawned {
            // Out of threads. With another thread alive, the queued job waits for it; with
            // none, nothing would ever run the queue, so the caller runs it (the queue's
            // oldest job: order is kept) rather than leave its waiter hanging.
            tracing::warn!(error = %e, "reactor: could not start a blocking-pool thread");
            let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
            st.threads -= 1;
            if st.threads == 0 {
                if let Some(job) = st.queue.pop_front() {
                    drop(st);
                    tracing::warn!(
                        "reactor: no blocking-pool thread; running the job on the caller's thread"
                    );
                    job.run();
                }
            }
        }
    }
}

fn worker(inner: &Inner) {
    let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(job) = st.queue.pop_front() {
            drop(st);
            // A panicking job must not take the thread down with the pool's accounting.
            let _ = catch_unwind(AssertUnwindSafe(|| job.run()));
            st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        if st.shutdown {
            st.threads -= 1;
            return;
        }
        st.idle += 1;
        let (g, timeout) = inner
            .work
            .wait_timeout(st, inner.idle_timeout)
            .unwrap_or_else(|e| e.into_inner());
        st = g;
        st.idle -= 1;
        if timeout.timed_out() && st.queue.is_empty() && st.threads > inner.min {
            st.threads -= 1;
            return;
        }
    }
}
