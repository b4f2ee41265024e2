//! `idle-cpu`: what adaptive polling costs when there is nothing to do. An `IoThread` (polling
//! on by default) gets a burst of work, then nothing; its thread's CPU time over the idle
//! period after the burst, in percent of that period. Polling must fall back to sleeping.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use reactor::{Backend, Builder, IoThread};

use crate::measure::{Metric, Sample};
use crate::scenarios::{Ctx, Row, System};

pub fn run(ctx: &Ctx) -> Vec<Row> {
    let idle = Duration::from_millis(ctx.scale(1000, 400));
    let systems = [Backend::Uring, Backend::Epoll]
        .into_iter()
        .map(|b| System::new(format!("reactor-{b}"), move || idle_cpu(b, idle)))
        .collect();
    ctx.interleave("idle-cpu-poll", Metric::Percent, systems)
}

/// CPU time of thread `tid` of this process, in nanoseconds (`/proc/.../schedstat`).
fn thread_cpu(tid: i64) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).expect("schedstat");
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat format")
}

/// How many bursts may pass without the reactor polling before the row fails: on a loaded
/// machine the burst's 10 µs spacing stretches (the producer is descheduled), waits grow past
/// the poll window, and a burst may not engage polling at all.
const BURSTS: usize = 20;

/// A burst of work arriving every ~10 µs, so that waits are short and the poll time grows.
/// Returns the reactor thread's id, the poll window, the backend, and how many polls the
/// reactor made so far.
fn burst(h: &reactor::Handle) -> (i64, Duration, Backend, u64) {
    let (tx, rx) = mpsc::channel();
    for i in 0..500 {
        let tx = tx.clone();
        h.oneshot(move |r| {
            if i == 499 {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                let s = r.stats();
                // The receiver waits below; it is only gone if this scenario already failed.
                let _ = tx.send((
                    tid,
                    r.poll_params().max,
                    r.backend(),
                    s.poll_hits + s.poll_misses,
                ));
            }
        })
        .expect("the IoThread is running");
        let t = Instant::now();
        while t.elapsed() < Duration::from_micros(10) {
            std::hint::spin_loop();
        }
    }
    rx.recv().expect("the burst ran")
}

fn idle_cpu(backend: Backend, idle: Duration) -> Sample {
    let io = IoThread::spawn("idle-bench", Builder::new().backend(backend)).expect("IoThread");
    let h = io.handle().clone();
    let mut attempt = 0;
    let (tid, max) = loop {
        let (tid, max, got, polls) = burst(&h);
        assert_eq!(got, backend);
        assert!(!max.is_zero(), "IoThread polls by default");
        if polls > 0 {
            break (tid, max);
        }
        attempt += 1;
        assert!(
            attempt < BURSTS,
            "{BURSTS} bursts of work never made the reactor poll (the machine is too loaded \
             to measure idle polling)"
        );
    };
    // ... then nothing: after one poll window it must sleep.
    std::thread::sleep(max * 4);
    let (c0, t0) = (thread_cpu(tid), Instant::now());
    std::thread::sleep(idle);
    let (c1, wall) = (thread_cpu(tid), t0.elapsed());
    drop(io);
    let pct = c1.saturating_sub(c0) as f64 / wall.as_nanos() as f64 * 100.0;
    Sample {
        value: pct,
        syscalls_per_op: None,
        cpu_ns_per_op: None,
        kernel_share: None,
        allocs_per_op: None,
    }
}
