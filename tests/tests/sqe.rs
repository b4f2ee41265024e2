//! Caller-built io_uring operations on the reactor's ring (`submit_sqe`), and the blocking
//! thread pool.

#[cfg(feature = "uring")]
use std::cell::{Cell, RefCell};
#[cfg(feature = "uring")]
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[cfg(feature = "uring")]
use reactor::io_uring::opcode;
#[cfg(feature = "uring")]
use reactor::{Backend, Completion};
use reactor::{ThreadPool, spawn_blocking};
use tests::{backend_tests, flush};

/// The caller-built SQE API exists when io_uring is built; on the epoll backend it refuses.
#[cfg(feature = "uring")]
mod sqe {
    use super::*;

    backend_tests! {
    fn submit_sqe_runs_on_io_uring_and_is_unsupported_on_epoll(r: &Reactor) {
        let got = Rc::new(Cell::new(None));
        let g2 = got.clone();
        // SAFETY: a NOP refers to no memory.
        let res = unsafe { r.submit_sqe(opcode::Nop::new().build(), move |_, c| g2.set(Some(c))) };
        match r.backend() {
            Backend::Uring => {
                res.unwrap();
                assert_eq!(r.ops_in_flight(), 1);
                r.run_until(|| got.get().is_some());
                assert_eq!(got.get(), Some(Completion { result: 0, flags: 0 }));
                assert_eq!(r.ops_in_flight(), 0);
            }
            _ => {
                let e = res.unwrap_err();
                assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
                assert!(e.to_string().contains("io_uring"), "{e}");
                assert_eq!(r.ops_in_flight(), 0, "the callback was not kept");
            }
        }
    }

    fn completions_run_before_bhs_and_a_nested_poll_continues_them(r: &Reactor) {
        if r.backend() != Backend::Uring {
            // On epoll the operation cannot be submitted at all (the test above checks the
            // error); nothing else to check here.
            // SAFETY: a NOP refers to no memory.
            assert!(unsafe { r.submit_sqe(opcode::Nop::new().build(), |_, _| {}) }.is_err());
            return;
        }
        let order = Rc::new(RefCell::new(Vec::new()));
        for i in 0..3 {
            let o = order.clone();
            // SAFETY: NOPs refer to no memory.
            unsafe {
                r.submit_sqe(opcode::Nop::new().build(), move |r, _| {
                    o.borrow_mut().push(format!("op{i}"));
                    if i == 0 {
                        // Nested: the queued completions of ops 1 and 2 run here, once.
                        r.poll(false);
                    }
                })
            }
            .unwrap();
        }
        let o = order.clone();
        let bh = r.bh(move |_| o.borrow_mut().push("bh".into()));
        r.poll(false); // submits
        let t0 = Instant::now();
        while order.borrow().len() < 3 && t0.elapsed() < Duration::from_secs(5) {
            bh.schedule();
            r.poll(true);
        }
        let got = order.borrow().clone();
        let first_bh = got.iter().position(|s| s == "bh").unwrap_or(got.len());
        assert!(first_bh >= 3, "the three completions came first: {got:?}");
        assert_eq!(got[..3], ["op0", "op1", "op2"], "each once, in order");
    }

    fn cancel_sqe_delivers_ecanceled(r: &Reactor) {
        if r.backend() != Backend::Uring {
            // SAFETY: a NOP refers to no memory.
            assert!(unsafe { r.submit_sqe(opcode::Nop::new().build(), |_, _| {}) }.is_err());
            return;
        }
        // A timeout operation that would fire in an hour, cancelled.
        let ts = Box::new(reactor::io_uring::types::Timespec::new().sec(3600));
        let got = Rc::new(Cell::new(None));
        let g2 = got.clone();
        let sqe = opcode::Timeout::new(&*ts).build();
        // SAFETY: the timespec lives in the callback's captures until the completion.
        let id = unsafe {
            r.submit_sqe(sqe, move |_, c| {
                let _ = &ts;
                g2.set(Some(c.result));
            })
        }
        .unwrap();
        r.poll(false);
        r.cancel_sqe(id).unwrap();
        r.run_until(|| got.get().is_some());
        assert_eq!(got.get(), Some(-libc::ECANCELED));
        assert_eq!(r.cancel_sqe(id).unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }
    }
}

backend_tests! {
    fn spawn_blocking_delivers_results_and_panics(r: &Reactor) {
        let v = r.block_on(spawn_blocking(|| std::thread::current().name().map(str::to_owned)));
        assert!(v.unwrap().unwrap().starts_with("reactor-blocking"));
        let e = r.block_on(spawn_blocking(|| -> () { panic!("pool job panics") })).unwrap_err();
        assert!(e.is_panic());
        // The pool survives a panicking job.
        assert_eq!(r.block_on(spawn_blocking(|| 5)).unwrap(), 5);
    }

    fn pool_bounds_threads_and_idle_ones_exit(r: &Reactor) {
        let pool = ThreadPool::new(1, 3, Duration::from_millis(50));
        let r2 = reactor::Builder::new().backend(r.backend()).thread_pool(pool.clone()).build().unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let jobs: Vec<_> = (0..12)
            .map(|_| {
                let (running, peak) = (running.clone(), peak.clone());
                                // Called inside the task, so that r2 is current and its pool is used.
                r2.spawn_local(async move {
                    spawn_blocking(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(10));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                })
            })
            .collect();
        r2.block_on(async {
            for j in jobs {
                j.await.unwrap().unwrap();
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 3, "at most max threads ran at once");
        assert!(pool.threads() >= 1);
        let t0 = Instant::now();
        while pool.threads() > 1 {
            assert!(t0.elapsed() < Duration::from_secs(5), "idle threads did not exit: {pool:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(pool.threads(), 1, "down to min");
        flush(&r2);
    }
}
