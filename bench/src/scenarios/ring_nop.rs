//! `ring-nop`: what one io_uring operation costs through the reactor, against raw rings. Each
//! operation is a NOP, which the kernel completes as soon as it is submitted, so nothing but
//! the ring path is measured: the reactor's slot, callback and iteration against a plain
//! ring and a tuned one (one issuer, deferred completion work, a registered ring fd).

use std::cell::Cell;
use std::rc::Rc;

use io_uring::{IoUring, opcode};
use reactor::{Backend, Reactor};

use crate::measure::{Metric, Sample, time};
use crate::scenarios::{Ctx, Row, System};

pub fn run(ctx: &Ctx) -> Vec<Row> {
    let n = ctx.scale(1_000_000, 200_000);
    let mut rows = Vec::new();
    for depth in [1u64, 32] {
        let name = format!("ring-nop-qd{depth}");
        let systems = vec![
            System::new("reactor-uring", move || reactor_nops(depth, n)),
            System::new("floor-raw-uring", move || raw_nops(depth, n, false)),
            System::new(crate::table::TUNED_FLOOR, move || raw_nops(depth, n, true)),
        ];
        rows.extend(ctx.interleave(&name, Metric::NsPerOp, systems));
    }
    rows
}

/// Submits one NOP on `r` whose completion counts itself and submits the next, until `n`
/// were issued.
fn issue(r: &Reactor, done: &Rc<Cell<u64>>, issued: &Rc<Cell<u64>>, n: u64) {
    if issued.get() >= n {
        return;
    }
    issued.set(issued.get() + 1);
    let (d, i) = (done.clone(), issued.clone());
    // SAFETY: a NOP refers to no memory.
    let res = unsafe {
        r.submit_sqe(opcode::Nop::new().build(), move |r, c| {
            assert_eq!(c.result, 0, "NOP failed");
            d.set(d.get() + 1);
            issue(r, &d, &i, n);
        })
    };
    res.expect("submit a NOP on the reactor's ring");
}

/// `depth` NOPs in flight through `Reactor::submit_sqe`, each completion submitting the next.
fn reactor_nops(depth: u64, n: u64) -> Sample {
    let r = Reactor::builder()
        .backend(Backend::Uring)
        .build()
        .expect("an io_uring reactor");
    assert_eq!(r.backend(), Backend::Uring);
    let (done, issued) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
    time(Metric::NsPerOp, n, || {
        for _ in 0..depth {
            issue(&r, &done, &issued, n);
        }
        r.run_until(|| done.get() >= n);
    })
}

/// The same on a raw ring: a plain one, or a tuned one (`SINGLE_ISSUER`, `DEFER_TASKRUN`,
/// registered ring fd); reaping in place, no allocation.
fn raw_nops(depth: u64, n: u64, tuned: bool) -> Sample {
    let mut b = IoUring::builder();
    if tuned {
        b.setup_single_issuer().setup_defer_taskrun();
    }
    let mut ring: IoUring = b.build(64).expect("an io_uring");
    let (mut submitter, mut sq, mut cq) = ring.split();
    if tuned {
        submitter
            .register_ring_fd()
            .expect("IORING_REGISTER_RING_FDS (Linux 5.18)");
    }
    let nop = opcode::Nop::new().build();
    time(Metric::NsPerOp, n, || {
        let (mut issued, mut done) = (0u64, 0u64);
        while issued < depth.min(n) {
            // SAFETY: a NOP refers to no memory.
            unsafe { sq.push(&nop) }.expect("room for the first NOPs");
            issued += 1;
        }
        sq.sync();
        while done < n {
            submitter.submit_and_wait(1).expect("io_uring_enter");
            cq.sync();
            for cqe in &mut cq {
                assert_eq!(cqe.result(), 0, "NOP failed");
                done += 1;
                if issued < n {
                    // SAFETY: as above.
                    unsafe { sq.push(&nop) }.expect("room: one out, one in");
                    issued += 1;
                }
            }
            sq.sync();
        }
    })
}
