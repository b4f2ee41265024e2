//! IoThread: a reactor on its own thread; what dropping it does to pending work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use reactor::{Builder, IoThread, time};
use tests::{Signal, backend_tests};

struct Flag(Arc<AtomicBool>);
impl Drop for Flag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

backend_tests! {
    fn runs_tasks_on_its_named_thread(r: &Reactor) {
        let io = IoThread::spawn("test-io", Builder::new().backend(r.backend())).unwrap();
        assert_eq!(io.name(), "test-io");
        let backend = r.backend();
        let jh = io
            .handle()
            .spawn(async move {
                time::sleep(Duration::from_millis(2)).await;
                let b = reactor::Reactor::with_current(|r| r.backend()).unwrap();
                (std::thread::current().name().map(str::to_owned), b)
            })
            .unwrap();
        let (name, b) = r.block_on(jh).unwrap();
        assert_eq!(name.as_deref(), Some("test-io"));
        assert_eq!(b, backend);
        io.join().unwrap();
    }

    fn drop_stops_and_joins_and_cancels_pending_work(r: &Reactor) {
        let io = IoThread::spawn("test-io-drop", Builder::new().backend(r.backend())).unwrap();
        let h = io.handle().clone();
        let never = Signal::new();
        let dropped = Arc::new(AtomicBool::new(false));
        let (w, d) = (never.wait(), dropped.clone());
        let pending = h
            .spawn(async move {
                let _f = Flag(d);
                w.await;
            })
            .unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let ran2 = ran.clone();
        h.oneshot_after(Duration::from_secs(3600), move |_| {
            ran2.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        // Make sure the task has started before dropping.
        let started = h.spawn(async {}).unwrap();
        r.block_on(started).unwrap();
        drop(io);
        assert!(dropped.load(Ordering::SeqCst), "the pending task's future was dropped");
        assert!(r.block_on(pending).unwrap_err().is_cancelled());
        assert_eq!(ran.load(Ordering::SeqCst), 0, "the timer never fired");
        assert!(h.is_closed());
        assert!(h.spawn(async {}).is_err(), "a handle to a stopped IoThread reports Closed");
    }

    fn a_bad_builder_fails_to_spawn_with_its_error(r: &Reactor) {
        let b = Builder::new().backend(r.backend()).uring_entries(0);
        let e = IoThread::spawn("test-io-bad", b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("uring_entries"), "{e}");
    }
}
