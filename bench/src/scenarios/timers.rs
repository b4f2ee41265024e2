//! `timers`: 100k sleeping tasks armed and fired (ns per timer), and the lateness of
//! `sleep(1 ms)` (p50 and p99, in ns late), on both backends and tokio.

use std::time::{Duration, Instant};

use reactor::{Backend, Reactor};

use crate::measure::{Metric, Sample, time};
use crate::scenarios::{Ctx, Row, System};

pub fn run(ctx: &Ctx) -> Vec<Row> {
    let n = ctx.scale(100_000, 100_000);
    let sleeps = ctx.scale(1000, 200) as usize;
    let mut rows = Vec::new();
    let mut systems: Vec<System> = [Backend::Uring, Backend::Epoll]
        .into_iter()
        .map(|b| System::new(format!("reactor-{b}"), move || reactor_many(b, n)))
        .collect();
    systems.push(System::new("tokio", move || tokio_many(n)));
    rows.extend(ctx.interleave("timers-100k", Metric::NsPerOp, systems));
    for (name, q) in [("sleep-1ms-p50-late", 0.50), ("sleep-1ms-p99-late", 0.99)] {
        let mut systems: Vec<System> = [Backend::Uring, Backend::Epoll]
            .into_iter()
            .map(|b| {
                System::new(format!("reactor-{b}"), move || {
                    quantile(reactor_lateness(b, sleeps), q)
                })
            })
            .collect();
        systems.push(System::new("tokio", move || {
            quantile(tokio_lateness(sleeps), q)
        }));
        rows.extend(ctx.interleave(name, Metric::NsPerOp, systems));
    }
    rows
}

/// Deadline of timer `i` of `n`: spread over the next millisecond.
fn spread(t0: Instant, i: u64, n: u64) -> Instant {
    t0 + Duration::from_nanos(1_000_000 * i / n)
}

fn reactor_many(backend: Backend, n: u64) -> Sample {
    let r = Reactor::builder().backend(backend).build().unwrap();
    assert_eq!(r.backend(), backend);
    let fired = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let s = time(Metric::NsPerOp, n, || {
        let t0 = Instant::now();
        for i in 0..n {
            let f = fired.clone();
            r.spawn_local(async move {
                reactor::time::sleep_until(spread(t0, i, n)).await;
                f.set(f.get() + 1);
            })
            .detach();
        }
        r.run_until(|| fired.get() == n);
    });
    assert_eq!(fired.get(), n, "every timer fired");
    s
}

fn tokio_many(n: u64) -> Sample {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let fired = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let s = time(Metric::NsPerOp, n, || {
        local.block_on(&rt, async {
            let t0 = Instant::now();
            let mut hs = Vec::with_capacity(n as usize);
            for i in 0..n {
                let f = fired.clone();
                hs.push(tokio::task::spawn_local(async move {
                    tokio::time::sleep_until(spread(t0, i, n).into()).await;
                    f.set(f.get() + 1);
                }));
            }
            for h in hs {
                h.await.unwrap();
            }
        })
    });
    assert_eq!(fired.get(), n, "every timer fired");
    s
}

/// Lateness (ns) of `count` sequential `sleep(1 ms)`s.
fn reactor_lateness(backend: Backend, count: usize) -> Vec<u64> {
    let r = Reactor::builder().backend(backend).build().unwrap();
    r.block_on(async {
        let mut late = Vec::with_capacity(count);
        for _ in 0..count {
            let t0 = Instant::now();
            reactor::time::sleep(Duration::from_millis(1)).await;
            let took = t0.elapsed();
            assert!(
                took >= Duration::from_millis(1),
                "a sleep ended early: {took:?}"
            );
            late.push((took - Duration::from_millis(1)).as_nanos() as u64);
        }
        late
    })
}

fn tokio_lateness(count: usize) -> Vec<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut late = Vec::with_capacity(count);
        for _ in 0..count {
            let t0 = Instant::now();
            tokio::time::sleep(Duration::from_millis(1)).await;
            let took = t0.elapsed();
            late.push(took.saturating_sub(Duration::from_millis(1)).as_nanos() as u64);
        }
        late
    })
}

fn quantile(mut v: Vec<u64>, q: f64) -> Sample {
    assert!(!v.is_empty());
    v.sort_unstable();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    Sample {
        value: v[i] as f64,
        syscalls_per_op: None,
        cpu_ns_per_op: None,
        kernel_share: None,
        allocs_per_op: None,
    }
}
