//! Bounds on io_uring submissions: a flood of `submit_sqe` from user code stays under a fixed
//! memory ceiling (`Builder::max_sqes_in_flight`), and runtime operations that find the ring's
//! submission queue and backlog full (a busy kernel) wait for room instead of failing.

use std::cell::Cell;
use std::rc::Rc;

use reactor::net::{SocketIo, UnixStream};
use reactor::{Backend, DEFAULT_MAX_SQES_IN_FLIGHT, Reactor};
use tests::backend_tests;

/// One test at a time: the flood measures the process's memory.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("VmRSS in /proc/self/status")
        * 1024
}

backend_tests! {
    fn a_flood_of_a_million_submissions_stays_under_a_memory_ceiling(r: &Reactor) {
        let _serial = serial();
        const N: u64 = 1_000_000;
        let done = Rc::new(Cell::new(0u64));
        let nop = || reactor::io_uring::opcode::Nop::new().build();
        let d = done.clone();
        // SAFETY: a NOP refers to no memory.
        let first = unsafe { r.submit_sqe(nop(), move |_, _| d.set(d.get() + 1)) };
        if r.backend() == Backend::Epoll {
            assert_eq!(first.unwrap_err().kind(), std::io::ErrorKind::Unsupported);
            return;
        }
        first.unwrap();
        let before = rss();
        let (mut submitted, mut refusals, mut peak, mut most) = (1u64, 0u64, 0u64, 0usize);
        while submitted < N {
            let d = done.clone();
            // SAFETY: as above.
            match unsafe { r.submit_sqe(nop(), move |_, _| d.set(d.get() + 1)) } {
                Ok(_) => submitted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // The bound: let the loop dispatch, then go on.
                    refusals += 1;
                    r.poll(false);
                }
                Err(e) => panic!("submit_sqe: {e}"),
            }
            most = most.max(r.ops_in_flight());
            if submitted % 50_000 == 0 {
                peak = peak.max(rss().saturating_sub(before));
            }
        }
        while done.get() < N {
            r.poll(true);
        }
        eprintln!("{N} NOPs: {refusals} refusals, at most {most} in flight, RSS +{} KiB at most", peak >> 10);
        assert!(refusals > 0, "the flood never met the bound");
        assert!(most <= DEFAULT_MAX_SQES_IN_FLIGHT, "{most} operations in flight");
        // 65,536 operations of a few dozen bytes each, and the completion queue (measured:
        // 5 MiB): well under the 62 MiB that 10^6 operations held before the bound.
        assert!(peak < 16 << 20, "RSS grew by {} MiB during the flood", peak >> 20);
        assert_eq!(r.ops_in_flight(), 0);
    }

    fn runtime_operations_wait_for_room_while_the_kernel_is_busy(r: &Reactor) {
        let _serial = serial();
        let backend = r.backend();
        let r = Reactor::builder()
            .backend(backend)
            .socket_io(SocketIo::Completion)
            .uring_entries(4)
            .build()
            .unwrap();
        let got = r.block_on(async {
            let pairs: Vec<(UnixStream, UnixStream)> =
                (0..32).map(|_| UnixStream::pair().unwrap()).collect();
            let (mine, theirs): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
            if backend == Backend::Uring {
                // The kernel refuses the submission that would make room (EBUSY): the reads
                // beyond the queue and its backlog wait until the next wait submits them.
                // (A task polled just before the reads', in the same round: no wait between.)
                Reactor::with_current(|r| {
                    r.spawn_local(async {
                        Reactor::with_current(|r| r.inject_monitor_errors(libc::EBUSY, 1))
                    })
                    .detach()
                })
                .unwrap();
            }
            let reads: Vec<_> = mine
                .into_iter()
                .map(|s| {
                    Reactor::with_current(|r| {
                        r.spawn_local(async move {
                            let (res, buf) = s.read(Vec::with_capacity(16)).await;
                            res.unwrap();
                            buf
                        })
                    })
                    .unwrap()
                })
                .collect();
            reactor::yield_now().await;
            for (i, t) in theirs.iter().enumerate() {
                let (res, _) = t.write_all(format!("read {i}").into_bytes()).await;
                res.unwrap();
            }
            let mut got = Vec::new();
            for jh in reads {
                got.push(String::from_utf8(jh.await.unwrap()).unwrap());
            }
            got
        });
        assert_eq!(got, (0..32).map(|i| format!("read {i}")).collect::<Vec<_>>());
        let st = r.stats();
        match backend {
            Backend::Uring => assert!(st.op_room_waits > 0, "{st:?}"),
            _ => assert_eq!(st.op_room_waits, 0, "epoll reads by readiness: {st:?}"),
        }
    }
}
