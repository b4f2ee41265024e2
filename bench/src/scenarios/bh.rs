//! `bh-local` and `bh-cross`: the BH scheduler on one thread and across threads.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use reactor::{Backend, Bh, Reactor};

use crate::measure::{Metric, Sample, time};
use crate::scenarios::{Ctx, Row, System};

fn reactor_on(backend: Backend) -> Reactor {
    let r = Reactor::builder()
        .backend(backend)
        .build()
        .expect("reactor");
    assert_eq!(r.backend(), backend, "{backend} must run, not a fallback");
    r
}

pub fn local(ctx: &Ctx) -> Vec<Row> {
    let n = ctx.scale(2_000_000, 300_000);
    let mut systems: Vec<System> = [Backend::Uring, Backend::Epoll]
        .into_iter()
        .map(|b| System::new(format!("reactor-{b}"), move || bh_local(b, n)))
        .collect();
    systems.push(System::new("tokio", move || tokio_yield(n)));
    ctx.interleave_counting_syscalls("bh-local", Metric::NsPerOp, systems)
}

/// tokio's equivalent: a task doing `yield_now` in a loop on a current_thread runtime.
fn tokio_yield(n: u64) -> Sample {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut count = 0u64;
    let s = time(Metric::NsPerOp, n, || {
        rt.block_on(async {
            for _ in 0..n {
                tokio::task::yield_now().await;
                count += 1;
            }
        })
    });
    assert_eq!(count, n);
    s
}

/// A BH that reschedules itself `n` times; one run per iteration.
fn bh_local(backend: Backend, n: u64) -> Sample {
    let r = reactor_on(backend);
    let count = Rc::new(Cell::new(0u64));
    let me: Rc<std::cell::OnceCell<Bh>> = Rc::new(std::cell::OnceCell::new());
    let (c2, me2) = (count.clone(), me.clone());
    let bh = r.bh(move |_| {
        c2.set(c2.get() + 1);
        if c2.get() < n {
            me2.get().unwrap().schedule();
        }
    });
    let _ = me.set(bh);
    let before = r.stats();
    let s = time(Metric::NsPerOp, n, || {
        me.get().unwrap().schedule();
        r.run_until(|| count.get() >= n);
    });
    assert_eq!(count.get(), n);
    let st = r.stats();
    assert_eq!(
        st.wakeups(),
        before.wakeups(),
        "a local BH never needs a wakeup"
    );
    s
}

pub fn cross(ctx: &Ctx) -> Vec<Row> {
    let n = ctx.scale(2_000_000, 300_000);
    let mut systems: Vec<System> = [Backend::Uring, Backend::Epoll]
        .into_iter()
        .map(|b| System::new(format!("reactor-{b}"), move || bh_cross(b, n)))
        .collect();
    systems.push(System::new("tokio", move || tokio_cross(n)));
    ctx.interleave_counting_syscalls("bh-cross", Metric::OpsPerSec, systems)
}

/// tokio's equivalent: a producer thread spawning `n` tasks into a current_thread runtime kept
/// busy by a yielding loop.
fn tokio_cross(n: u64) -> Sample {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let (h, d2, go2) = (rt.handle().clone(), done.clone(), go.clone());
    let producer = std::thread::spawn(move || {
        while !go2.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        for _ in 0..n {
            let d3 = d2.clone();
            h.spawn(async move {
                d3.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    let s = time(Metric::OpsPerSec, n, || {
        go.store(true, Ordering::Release);
        rt.block_on(async {
            while done.load(Ordering::Relaxed) < n {
                tokio::task::yield_now().await;
            }
        })
    });
    producer.join().unwrap();
    s
}

/// One producer thread posts `n` one-shots into a reactor that is kept busy by a local BH.
fn bh_cross(backend: Backend, n: u64) -> Sample {
    let r = reactor_on(backend);
    let done = Arc::new(AtomicU64::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let (h, d2, go2) = (r.handle(), done.clone(), go.clone());
    let producer = std::thread::spawn(move || {
        while !go2.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        for _ in 0..n {
            let d3 = d2.clone();
            h.oneshot(move |_| {
                d3.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
        }
    });
    let s = time(Metric::OpsPerSec, n, || {
        go.store(true, Ordering::Release);
        // Busy: non-blocking polls, as a loaded storage reactor would be.
        while done.load(Ordering::Relaxed) < n {
            r.poll(false);
        }
    });
    producer.join().unwrap();
    assert_eq!(done.load(Ordering::Relaxed), n);
    s
}
