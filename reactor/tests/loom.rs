//! Model checks of the notification protocol with loom.
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" cargo test -p reactor --test loom --release
//! RUSTFLAGS='--cfg loom --cfg reactor_weaken="sp4"' cargo test -p reactor --test loom --release
//! ```
//!
//! `protocol.rs` (the BH flags, the BH list and the notifier, with SP1–SP8) is compiled here
//! against loom's atomics through a `sync` module of loom types. The eventfd is a loom-visible
//! counter. Each model states the property it checks; built with `--cfg reactor_weaken="spN"`,
//! the model that depends on SPN must *fail*, and its test asserts that loom finds the failure
//! (a model that still passes with its barrier removed would be a defect in the model).

#![cfg(loom)]

mod sync {
    pub(crate) use loom::sync::atomic::{
        AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering, fence,
    };
}

#[allow(dead_code)]
#[path = "../src/lockfree/protocol.rs"]
mod protocol;

use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use protocol::{Link, Notifier, PENDING, SCHEDULED, Wake};

/// The eventfd, as a counter loom can see.
struct Eventfd(loom::sync::atomic::AtomicU64);

impl Wake for Eventfd {
    fn wake(&self) {
        // SeqCst: a write(2) is a full barrier in practice.
        self.0.fetch_add(1, loom::sync::atomic::Ordering::SeqCst);
    }
}

/// A BH node: its link first, then a payload written by schedulers and read by the "callback".
#[repr(C)]
struct Node {
    link: Link,
    payload: UnsafeCell<u32>,
}

struct Shared {
    notifier: Notifier<Eventfd>,
    node: Node,
    /// A second BH, for the models that need two on the list.
    other: Node,
}

fn shared() -> Arc<Shared> {
    let node = || Node {
        link: Link::new(0),
        payload: UnsafeCell::new(0),
    };
    Arc::new(Shared {
        notifier: Notifier::new(Eventfd(loom::sync::atomic::AtomicU64::new(0))),
        node: node(),
        other: node(),
    })
}

impl Shared {
    /// What `Bh::schedule` does: SP1, SP2 if needed, then SP3/SP4.
    fn schedule(&self) {
        self.schedule_node(&self.node);
    }

    fn schedule_node(&self, node: &Node) {
        let old = node.link.mark(SCHEDULED);
        if old & PENDING == 0 {
            self.notifier.list.push(&node.link).unwrap();
        }
        self.notifier.notify();
    }

    /// What the home thread does with a taken chain: walk it through the `next` links, unlink
    /// each node, clear PENDING (SP8), and "run" it if SCHEDULED (reading its payload). Returns
    /// the runs; each node is found at most once.
    fn drain(&self, mut p: *mut Link) -> u32 {
        let mut runs = 0;
        let mut seen = [false; 2];
        while !p.is_null() {
            let i = [&self.node, &self.other]
                .iter()
                .position(|n| std::ptr::eq(p, &n.link))
                .expect("only our nodes are ever on the list");
            assert!(!seen[i], "a node is queued at most once");
            seen[i] = true;
            let node = if i == 0 { &self.node } else { &self.other };
            // SAFETY: the node is PENDING and this thread took it.
            let next = unsafe { (*p).next() };
            let old = node.link.unmark();
            if old & SCHEDULED != 0 {
                // The "callback": must see what the scheduler wrote before scheduling.
                // SAFETY: loom checks that this read is ordered after the write.
                node.payload.with(|v| assert_eq!(unsafe { *v }, 7));
                runs += 1;
            }
            p = next;
        }
        runs
    }
}

static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);

/// Runs `model` under loom, counting explored executions. With `weakened`, the model must fail.
fn check(name: &str, weakened: bool, model: impl Fn() + Sync + Send + 'static) {
    EXECUTIONS.store(0, StdOrdering::Relaxed);
    let mut b = loom::model::Builder::new();
    b.preemption_bound = None;
    let run = move || {
        b.check(move || {
            EXECUTIONS.fetch_add(1, StdOrdering::Relaxed);
            model()
        })
    };
    if weakened {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
        assert!(
            r.is_err(),
            "{name}: loom found no failure with its synchronisation point weakened"
        );
        eprintln!(
            "{name}: failure found, as expected, after {} executions",
            EXECUTIONS.load(StdOrdering::Relaxed)
        );
    } else {
        run();
        eprintln!(
            "{name}: {} executions explored, no failure",
            EXECUTIONS.load(StdOrdering::Relaxed)
        );
    }
}

/// A producer schedules a BH while the home thread is about to block: the home thread either
/// sees the work or `notified` (and does not sleep), or the eventfd is written. Never both
/// missed. Depends on SP4 and SP5.
#[test]
fn lost_wakeup() {
    let weak = cfg!(reactor_weaken = "sp4") || cfg!(reactor_weaken = "sp5");
    check("lost_wakeup", weak, || {
        let s = shared();
        let p = s.clone();
        let producer = thread::spawn(move || {
            // SAFETY: loom checks the accesses to the payload.
            p.node.payload.with_mut(|v| unsafe { *v = 7 });
            p.schedule();
        });
        // Home: the timeout computation peeks at the list (unordered) ...
        let saw_work = !s.notifier.list.peek().is_null();
        // ... and, seeing nothing, announces that it may sleep (SP5).
        let slept = !saw_work && !s.notifier.prepare_block();
        producer.join().unwrap();
        if slept {
            // It went to sleep: only the eventfd can wake it.
            let woken = s
                .notifier
                .waker()
                .0
                .load(loom::sync::atomic::Ordering::SeqCst);
            assert!(woken > 0, "lost wakeup");
        }
        // Whatever happened, the work is found by the next accept and take.
        s.notifier.accept();
        assert_eq!(s.drain(s.notifier.list.take()), 1, "the BH runs once");
    });
}

/// After the home thread clears `notified`, the work of every notification it consumed is
/// visible to its take: if the take misses a producer's work, `notified` is still set for the
/// next iteration. A second producer only notifies, so the "already notified" shortcut is
/// exercised. Depends on SP3 and SP6.
#[test]
fn accept_then_take() {
    let weak = cfg!(reactor_weaken = "sp3") || cfg!(reactor_weaken = "sp6");
    check("accept_then_take", weak, || {
        let s = shared();
        let (p1, p2) = (s.clone(), s.clone());
        let a = thread::spawn(move || {
            // SAFETY: loom checks the accesses to the payload.
            p1.node.payload.with_mut(|v| unsafe { *v = 7 });
            p1.schedule();
        });
        let b = thread::spawn(move || p2.notifier.notify());
        // Home, busy (notify_me == 0): accept, then take.
        s.notifier.accept();
        let runs = s.drain(s.notifier.list.take());
        a.join().unwrap();
        b.join().unwrap();
        if runs == 0 {
            assert!(
                s.notifier.is_notified(),
                "work consumed neither by the take nor left announced"
            );
            assert_eq!(s.drain(s.notifier.list.take()), 1);
        }
    });
}

/// What a scheduler writes before scheduling is visible to the callback when the BH is taken
/// from the list. Depends on SP2 and SP7.
#[test]
fn publication_through_the_list() {
    let weak = cfg!(reactor_weaken = "sp2") || cfg!(reactor_weaken = "sp7");
    check("publication_through_the_list", weak, || {
        let s = shared();
        let p = s.clone();
        // One producer schedules two BHs: the second's `next` points at the first, and the
        // home thread must see that link (and both payloads) when it takes the list.
        let producer = thread::spawn(move || {
            for n in [&p.node, &p.other] {
                // SAFETY: loom checks the accesses to the payload.
                n.payload.with_mut(|v| unsafe { *v = 7 });
                p.schedule_node(n);
            }
        });
        let first = s.drain(s.notifier.list.take());
        producer.join().unwrap();
        assert_eq!(
            first + s.drain(s.notifier.list.take()),
            2,
            "both ran, once each"
        );
    });
}

/// A BH that is already queued (PENDING, its earlier schedule cancelled) is scheduled again
/// while the home thread dequeues it: the run, if it happens at that dequeue, sees the
/// scheduler's writes; the schedule is neither lost nor run twice. Depends on SP1 and SP8.
#[test]
fn schedule_racing_with_cancel_and_dequeue() {
    let weak = cfg!(reactor_weaken = "sp1") || cfg!(reactor_weaken = "sp8");
    check("schedule_racing_with_cancel_and_dequeue", weak, || {
        let s = shared();
        // Queued and then cancelled: PENDING set, SCHEDULED clear, already taken by the home
        // thread (it sits in the run queue).
        s.node.link.mark(SCHEDULED);
        s.notifier.list.push(&s.node.link).unwrap();
        s.node.link.cancel();
        let queued = s.notifier.list.take();
        let p = s.clone();
        let producer = thread::spawn(move || {
            // SAFETY: loom checks the accesses to the payload.
            p.node.payload.with_mut(|v| unsafe { *v = 7 });
            p.schedule();
        });
        let runs = s.drain(queued);
        producer.join().unwrap();
        s.notifier.accept();
        assert_eq!(
            runs + s.drain(s.notifier.list.take()),
            1,
            "the schedule ran exactly once"
        );
    });
}

/// Two producers schedule the same BH concurrently: it is queued once and runs once per
/// schedule at most.
#[test]
fn two_producers_one_run() {
    check("two_producers_one_run", false, || {
        let s = shared();
        // SAFETY: loom checks the accesses to the payload.
        s.node.payload.with_mut(|v| unsafe { *v = 7 });
        let (p1, p2) = (s.clone(), s.clone());
        let a = thread::spawn(move || p1.schedule());
        let b = thread::spawn(move || p2.schedule());
        let mid = s.drain(s.notifier.list.take());
        a.join().unwrap();
        b.join().unwrap();
        let total = mid + s.drain(s.notifier.list.take());
        assert!(
            (1..=2).contains(&total),
            "at least once, at most once per schedule"
        );
        if mid == 0 {
            assert_eq!(total, 1, "two schedules before any run: one run");
        }
    });
}

/// A schedule racing with a cancel and a dequeue: at most one run, and no data race.
#[test]
fn cancel_racing_with_schedule() {
    check("cancel_racing_with_schedule", false, || {
        let s = shared();
        let (p, c) = (s.clone(), s.clone());
        let producer = thread::spawn(move || {
            // SAFETY: loom checks the accesses to the payload.
            p.node.payload.with_mut(|v| unsafe { *v = 7 });
            p.schedule();
        });
        let canceller = thread::spawn(move || c.node.link.cancel());
        let mid = s.drain(s.notifier.list.take());
        producer.join().unwrap();
        canceller.join().unwrap();
        assert!(mid + s.drain(s.notifier.list.take()) <= 1);
    });
}
