//! Model checks of the notification protocol with loom.
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" cargo test -p reactor --test loom --release
//! RUSTFLAGS='--cfg loom --cfg reactor_weaken="sp4"' cargo test -p reactor --test loom --release
//! ```
//!
//! `protocol.rs` (the BH flags, the BH list with its announcement word, and the notifier, with
//! SP1–SP8) is compiled here against loom's atomics through a `sync` module of loom types. The
//! doorbell is a loom-visible counter. Each model states the property it checks; built with `--cfg reactor_weaken="spN"`,
//! the model that depends on SPN must *fail*, and its test asserts that loom finds the failure
//! (a model that still passes with its barrier removed would be a defect in the model).

#![cfg(loom)]

mod sync {
    pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering, fence};
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
    /// What a notifier without a node publishes (a stop request), read by the home thread
    /// once it has taken the notification.
    stop: UnsafeCell<u32>,
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
        stop: UnsafeCell::new(0),
    })
}

impl Shared {
    /// What `Bh::schedule` does: SP1, then SP2 (push) or SP3 (already queued: notify), then
    /// SP4 if this announcement is the first since the last take.
    fn schedule(&self) {
        self.schedule_node(&self.node);
    }

    fn schedule_node(&self, node: &Node) {
        let old = node.link.mark(SCHEDULED);
        if old & PENDING == 0 {
            self.notifier.push(&node.link).unwrap();
        } else {
            self.notifier.notify().unwrap();
        }
    }

    /// What `Handle::stop` does: publishes the request, then notifies (SP3, SP4).
    fn stop(&self) {
        // SAFETY: loom checks the accesses to the request.
        self.stop.with_mut(|v| unsafe { *v = 1 });
        self.notifier.notify().unwrap();
    }

    /// The home thread went to sleep (`slept`): then only the doorbell can have woken it.
    fn assert_woken_if(&self, slept: bool) {
        if slept {
            let woken = self
                .notifier
                .waker()
                .0
                .load(loom::sync::atomic::Ordering::SeqCst);
            assert!(woken > 0, "lost wakeup");
        }
    }

    /// The home thread's take (SP7): runs the taken BHs and, if a notification without a node
    /// was taken, reads what it published. Returns the runs and whether it took one.
    fn take(&self) -> (u32, bool) {
        let (nodes, notified) = self.notifier.list.take();
        if notified {
            // A notification without a node: a stop request, or a schedule of a BH that was
            // already queued. Reading the request here is a data race (which loom reports)
            // unless it is ordered after the request's write.
            // SAFETY: loom checks the accesses to the request.
            let stop = self.stop.with(|v| unsafe { *v });
            assert!(stop <= 1);
        }
        (self.drain(nodes), notified)
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
/// sees the work announced (and does not sleep), or the doorbell rings. Never both
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
        s.assert_woken_if(slept);
        // Whatever happened, the work is found by the next take.
        assert_eq!(s.take().0, 1, "the BH runs once");
    });
}

/// A stop request (a notification without a node) while the home thread is about to block:
/// never both missed, as for a schedule. Depends on SP4 and SP5.
#[test]
fn lost_wakeup_of_a_notification() {
    let weak = cfg!(reactor_weaken = "sp4") || cfg!(reactor_weaken = "sp5");
    check("lost_wakeup_of_a_notification", weak, || {
        let s = shared();
        let p = s.clone();
        let producer = thread::spawn(move || p.stop());
        let slept = !s.notifier.prepare_block();
        producer.join().unwrap();
        s.assert_woken_if(slept);
        assert!(s.take().1, "the request is taken");
    });
}

/// A take consumes each announcement together with its work: what a notifier published before
/// notifying is visible once its notification is taken, and what a take misses stays announced
/// for the next one. The second producer only notifies, while the first may find the word
/// already announced (the shortcut that skips the fence). Depends on SP3 and SP7.
#[test]
fn notification_then_take() {
    let weak = cfg!(reactor_weaken = "sp3") || cfg!(reactor_weaken = "sp7");
    check("notification_then_take", weak, || {
        let s = shared();
        let (p1, p2) = (s.clone(), s.clone());
        let a = thread::spawn(move || {
            // SAFETY: loom checks the accesses to the payload.
            p1.node.payload.with_mut(|v| unsafe { *v = 7 });
            p1.schedule();
        });
        let b = thread::spawn(move || p2.stop());
        // Home, busy (notify_me == 0): takes.
        let (runs, notified) = s.take();
        a.join().unwrap();
        b.join().unwrap();
        if runs == 0 || !notified {
            assert!(
                s.notifier.is_notified(),
                "work consumed neither by the take nor left announced"
            );
        }
        let (more, notified_later) = s.take();
        assert_eq!(runs + more, 1, "the BH runs once");
        assert!(notified ^ notified_later, "the request is taken once");
        assert!(!s.notifier.is_notified(), "nothing left announced");
    });
}

/// The reactor is dropped while a producer schedules: the nodes its close finds on the list are
/// fully published (their payload is visible when they are freed), and a schedule after the
/// close fails instead of queueing. Depends on SP6 and the release it pairs with, SP2.
#[test]
fn close_racing_with_a_schedule() {
    let weak = cfg!(reactor_weaken = "sp6") || cfg!(reactor_weaken = "sp2");
    check("close_racing_with_a_schedule", weak, || {
        let s = shared();
        let p = s.clone();
        let producer = thread::spawn(move || {
            // SAFETY: loom checks the accesses to the payload.
            p.node.payload.with_mut(|v| unsafe { *v = 7 });
            p.node.link.mark(SCHEDULED);
            p.notifier.push(&p.node.link).is_ok()
        });
        // What `BhHome::shutdown` does with the nodes it finds: no dequeue (no SP8), it reads
        // their fixed flags and frees them, dropping what their scheduler wrote.
        let mut p = s.notifier.list.close();
        let mut left = 0;
        while !p.is_null() {
            assert!(std::ptr::eq(p, &s.node.link));
            // SAFETY: a closed list's nodes are linked only by this thread now.
            let next = unsafe { (*p).next() };
            assert_ne!(s.node.link.flags() & PENDING, 0);
            // SAFETY: loom checks that this read is ordered after the scheduler's write.
            s.node.payload.with(|v| assert_eq!(unsafe { *v }, 7));
            left += 1;
            p = next;
        }
        let queued = producer.join().unwrap();
        assert_eq!(
            left,
            u32::from(queued),
            "queued exactly when the push succeeded"
        );
        assert!(s.notifier.list.is_closed());
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
        let first = s.take().0;
        producer.join().unwrap();
        assert_eq!(first + s.take().0, 2, "both ran, once each");
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
        let (queued, _) = s.notifier.list.take();
        let p = s.clone();
        let producer = thread::spawn(move || {
            // SAFETY: loom checks the accesses to the payload.
            p.node.payload.with_mut(|v| unsafe { *v = 7 });
            p.schedule();
        });
        let runs = s.drain(queued);
        producer.join().unwrap();
        assert_eq!(runs + s.take().0, 1, "the schedule ran exactly once");
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
        let mid = s.take().0;
        a.join().unwrap();
        b.join().unwrap();
        let total = mid + s.take().0;
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
        let mid = s.take().0;
        producer.join().unwrap();
        canceller.join().unwrap();
        assert!(mid + s.take().0 <= 1);
    });
}
