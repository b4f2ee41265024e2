//! Adaptive busy polling: poll handlers, the notifier's poll check, grow and shrink.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reactor::{FdHandler, PollParams, Reactor};
use tests::{RealTime, backend_tests, flush, pipe, read_fd, write_fd};

/// Runs this binary's tests one at a time: the shared-CPU test pins a busy thread to a CPU,
/// which would make the others' spins find their CPU shared and end early.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The calling thread and a busy one pinned to the first CPU this thread may use, for the
/// guard's life; the thread's own CPU set comes back on drop.
struct SharedCpu {
    saved: libc::cpu_set_t,
    stop: Arc<AtomicBool>,
    /// Rounds of the busy thread's loop.
    rounds: Arc<AtomicU64>,
    busy: Option<std::thread::JoinHandle<()>>,
    /// This thread's real-time class, if it took one (given up after the busy thread stops).
    _rt: Option<RealTime>,
}

impl SharedCpu {
    /// Both threads ordinary ones (`SCHED_OTHER`): the loop waits for its CPU about half the
    /// time it is runnable.
    fn start() -> SharedCpu {
        SharedCpu::with(false)
    }

    /// Both threads in the real-time class (`SCHED_FIFO`, one priority), the busy one giving
    /// the CPU back after 50 µs of each turn (and sleeping 200 µs after every eighth): a
    /// `sched_yield` of the loop runs the busy thread at once, for 50 µs, whatever else the
    /// machine runs. (Between ordinary threads the
    /// kernel may pick the yielder again: under EEVDF, Linux 6.6+, a thread that has had more
    /// than its share of the CPU is not eligible, and the test then waited 10 s for a yield
    /// that ran the other thread, on an idle machine 2 runs in 3.)
    fn start_taking_turns() -> SharedCpu {
        SharedCpu::with(true)
    }

    fn with(turns: bool) -> SharedCpu {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
        let mut saved: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a writable cpu_set_t of `size` bytes; pid 0 is this thread.
        assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut saved) }, 0);
        let cpu = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `c` is below CPU_SETSIZE, so CPU_ISSET reads within `saved`.
            .find(|&c| unsafe { libc::CPU_ISSET(c, &saved) })
            .expect("this thread may run on some CPU");
        let pin = move || {
            // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
            let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: `cpu` is below CPU_SETSIZE, so CPU_SET writes within `one`.
            unsafe { libc::CPU_SET(cpu, &mut one) };
            // SAFETY: `one` is a valid cpu_set_t of `size` bytes; pid 0 is this thread.
            assert_eq!(unsafe { libc::sched_setaffinity(0, size, &one) }, 0);
        };
        pin();
        let rt = turns.then(RealTime::enter);
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (stop2, rounds2) = (stop.clone(), rounds.clone());
        // Ends with the guard, which stops it on drop (panics included).
        let busy = std::thread::spawn(move || {
            pin();
            let _rt = turns.then(RealTime::enter);
            let (mut turn, mut turns_taken) = (Instant::now(), 0u32);
            // Relaxed (both): a stop flag and a progress count; the thread is joined.
            while !stop2.load(Ordering::Relaxed) {
                rounds2.fetch_add(1, Ordering::Relaxed);
                std::hint::spin_loop();
                if turns && turn.elapsed() > Duration::from_micros(50) {
                    turns_taken += 1;
                    if turns_taken % 8 == 0 {
                        // Off the CPU now and then, as a client waiting for its reply is:
                        // the loop's yields meanwhile return at once, which is what it
                        // measures the others against.
                        std::thread::sleep(Duration::from_micros(200));
                    } else {
                        // SAFETY: sched_yield takes no arguments.
                        unsafe { libc::sched_yield() };
                    }
                    turn = Instant::now();
                }
            }
        });
        SharedCpu {
            saved,
            stop,
            rounds,
            busy: Some(busy),
            _rt: rt,
        }
    }

    /// Rounds the busy thread has made so far.
    fn progress(&self) -> u64 {
        // Relaxed: a progress count.
        self.rounds.load(Ordering::Relaxed)
    }
}

impl Drop for SharedCpu {
    fn drop(&mut self) {
        // Relaxed: see the loop; the join orders the rest.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(b) = self.busy.take() {
            let _ = b.join();
        }
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `saved` is the valid cpu_set_t this thread had before, of `size` bytes.
        let rc = unsafe { libc::sched_setaffinity(0, size, &self.saved) };
        assert!(
            rc == 0 || std::thread::panicking(),
            "restoring the CPU set failed"
        );
    }
}

/// Blocking polls on timers `wait` out, until the poll time reaches `target` (each such wait is
/// shorter than `max`, so the poll time grows).
fn grow_to(r: &Reactor, wait: Duration, target: Duration) {
    let fired = Rc::new(Cell::new(0u32));
    let f2 = fired.clone();
    let t = r.timer(move |_| f2.set(f2.get() + 1));
    for round in 0..40 {
        if r.poll_time() >= target {
            return;
        }
        t.arm_after(wait);
        let before = fired.get();
        while fired.get() == before {
            r.poll(true);
        }
        assert!(round < 39, "poll time stuck at {:?}", r.poll_time());
    }
}

backend_tests! {
    fn an_fd_found_ready_while_spinning_is_dispatched_by_that_poll(r: &Reactor) {
        let _serial = serial();
        // A CPU whenever the loop wants one, on a busy machine too.
        let _rt = RealTime::enter();
        // What is tested is the spin: a loaded machine must not make it stand down.
        r.set_poll_stand_down(false);
        r.set_poll(PollParams { max: Duration::from_millis(50), grow: 2, shrink: 0 });
        grow_to(r, Duration::from_millis(3), Duration::from_millis(2));
        let (rd, wr) = pipe().unwrap();
        let (rd, wr) = (Rc::new(rd), Arc::new(wr));
        let n = Rc::new(Cell::new(0u32));
        let (rd2, n2) = (rd.clone(), n.clone());
        let id = r
            .add_fd(
                rd.as_raw_fd(),
                FdHandler::new().on_read(move |_, _| {
                    let mut b = [0u8; 1];
                    read_fd(&rd2, &mut b);
                    n2.set(n2.get() + 1);
                }),
            )
            .unwrap();
        let mut hits = 0u32;
        // Twenty rounds: on io_uring the spin sees the flag before the completion only now
        // and then; and a slow machine may miss the spin window.
        for round in 1..=20u32 {
            let w2 = wr.clone();
            let writer = std::thread::spawn(move || {
                let _rt = RealTime::enter();
                std::thread::sleep(Duration::from_millis(1));
                write_fd(&w2, b"x");
            });
            let ran = n.get();
            while r.poll(false) {}
            while n.get() == ran {
                let before = r.stats().poll_hits;
                let was = n.get();
                r.poll(true);
                let found = r.stats().poll_hits > before;
                // On io_uring the spin may see the kernel's flag for deferred completion work
                // before any completion exists: the poll must still enter and dispatch it.
                assert!(!found || n.get() > was, "round {round}: found by spinning, not dispatched: {:?}", r.stats());
                hits += u32::from(found);
            }
            writer.join().unwrap();
        }
        assert!(hits > 0, "no poll ever found the fd by spinning");
        r.remove_fd(id).unwrap();
    }

    fn a_long_spin_gives_the_cpu_away_now_and_then(r: &Reactor) {
        let _serial = serial();
        // A CPU whenever the loop wants one, on a busy machine too.
        let _rt = RealTime::enter();
        // What is tested is the spin: a loaded machine must not make it stand down.
        r.set_poll_stand_down(false);
        r.set_poll(PollParams { max: Duration::from_millis(50), grow: 2, shrink: 0 });
        let before = r.stats();
        // A wait (1 ms) within the poll time: the poll spins all of it, and a thread sharing
        // this CPU must get it on the way (a sched_yield every 2 µs). Up to 5 tries, for a
        // loaded machine or valgrind, where the thread may lose its CPU for the whole wait
        // before it spins.
        let t = r.timer(|_| {});
        for _ in 0..5 {
            grow_to(r, Duration::from_millis(3), Duration::from_millis(2));
            t.arm_after(Duration::from_millis(1));
            while t.is_armed() {
                r.poll(true);
            }
            if r.stats().poll_yields > before.poll_yields {
                break;
            }
        }
        let after = r.stats();
        assert!(after.poll_misses > before.poll_misses, "the spin ran to its end: {after:?}");
        assert!(after.poll_yields > before.poll_yields, "no yield in a 1 ms spin: {after:?}");
    }

    fn a_spin_that_finds_its_cpu_shared_lets_the_other_thread_run_and_waits(r: &Reactor) {
        let _serial = serial();
        // What is tested is the spin: a loaded machine must not make it stand down.
        r.set_poll_stand_down(false);
        // This thread and a busy one on one CPU: a yield of the spin runs the busy thread,
        // so the loop learns that it shares its CPU and waits instead of spinning on.
        let busy = SharedCpu::start_taking_turns();
        r.set_poll(PollParams { max: Duration::from_millis(20), grow: 2, shrink: 0 });
        let t = r.timer(|_| {});
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < give_up, "never found its CPU shared: {:?}", r.stats());
            let before = r.stats();
            let ran = busy.progress();
            // A short wait (within max): the poll time grows, and each wait starts with a
            // spin (or, once the CPU is known to be shared, with a yield and a look).
            t.arm_after(Duration::from_micros(500));
            while t.is_armed() {
                r.poll(true);
            }
            let after = r.stats();
            if after.poll_shared > before.poll_shared {
                assert!(busy.progress() > ran, "the busy thread never ran");
                assert!(after.poll_yields > before.poll_yields, "{after:?}");
                assert!(after.blocking_waits > before.blocking_waits, "it waited: {after:?}");
                break;
            }
        }
    }

    fn a_loop_that_waits_for_its_cpu_stops_polling_until_the_cpu_is_its_own_again(r: &Reactor) {
        let _serial = serial();
        r.set_poll(PollParams { max: Duration::from_millis(20), grow: 2, shrink: 0 });
        let t = r.timer(|_| {});
        // Short waits (within max): every one of them would start with a spin.
        let wait_once = || {
            t.arm_after(Duration::from_micros(500));
            while t.is_armed() {
                r.poll(true);
            }
        };
        {
            // This thread and a busy one on one CPU: whenever the loop is runnable, it waits
            // for the CPU about half the time, far above a tenth.
            let busy = SharedCpu::start();
            let give_up = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(Instant::now() < give_up, "never stood down: {:?}", r.stats());
                let before = r.stats();
                wait_once();
                if r.stats().poll_contended > before.poll_contended {
                    break;
                }
            }
            // Standing down, an iteration waits at once: no spin, no yield, no look. And it
            // stays down (for 64 ms at least, whatever the samples say meanwhile): 40 ms of
            // such waits, not one spin.
            let before = r.stats();
            let ran = busy.progress();
            let until = Instant::now() + Duration::from_millis(40);
            while Instant::now() < until {
                wait_once();
            }
            let after = r.stats();
            assert!(after.poll_contended > before.poll_contended, "{after:?}");
            assert_eq!(
                (after.poll_hits, after.poll_misses, after.poll_yields, after.poll_shared),
                (before.poll_hits, before.poll_misses, before.poll_yields, before.poll_shared),
                "it spun while standing down"
            );
            assert!(
                after.poll_contended - before.poll_contended
                    >= after.blocking_waits - before.blocking_waits,
                "every wait stood down: {after:?}"
            );
            assert!(busy.progress() > ran, "the busy thread never ran");
            // A loop that may not stand down spins on the same contended CPU.
            r.set_poll_stand_down(false);
            let before = r.stats();
            wait_once();
            let after = r.stats();
            assert_eq!(after.poll_contended, before.poll_contended);
            assert!(after.poll_misses + after.poll_hits + after.poll_shared > before.poll_misses + before.poll_hits + before.poll_shared, "{after:?}");
            r.set_poll_stand_down(true);
        }
        // The busy thread is gone and this thread has its CPUs back: within a few samples
        // (4 ms each) the loop spins again.
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < give_up, "never polled again: {:?}", r.stats());
            let before = r.stats();
            wait_once();
            let after = r.stats();
            if after.poll_contended == before.poll_contended
                && after.poll_misses + after.poll_hits > before.poll_misses + before.poll_hits
            {
                break;
            }
        }
        r.set_poll(PollParams::OFF);
    }

    fn poll_time_grows_on_short_waits_and_resets_on_long_ones(r: &Reactor) {
        let _serial = serial();
        // A CPU whenever the loop wants one, on a busy machine too.
        let _rt = RealTime::enter();
        // What is tested is the spin: a loaded machine must not make it stand down.
        r.set_poll_stand_down(false);
        assert_eq!(r.poll_params(), PollParams::OFF, "off by default on a bare reactor");
        r.set_poll(PollParams { max: Duration::from_millis(2), grow: 2, shrink: 0 });
        assert_eq!(r.poll_time(), Duration::ZERO);
        grow_to(r, Duration::from_micros(100), Duration::from_micros(64));
        let grown = r.poll_time();
        assert!(grown >= Duration::from_micros(64) && grown <= Duration::from_millis(2), "{grown:?}");
        // A wait far longer than max: polling that long would be waste; back to zero.
        let t = r.timer(|_| {});
        t.arm_after(Duration::from_millis(20));
        while t.is_armed() {
            r.poll(true);
        }
        assert_eq!(r.poll_time(), Duration::ZERO, "reset by a long wait (shrink 0)");
        let s = r.stats();
        assert!(s.poll_misses > 0, "{s:?}");
        r.set_poll(PollParams::OFF);
        assert_eq!(r.poll_time(), Duration::ZERO);
    }

    fn poll_handler_finds_work_without_the_fd(r: &Reactor) {
        let _serial = serial();
        // A CPU whenever the loop wants one, on a busy machine too.
        let _rt = RealTime::enter();
        // What is tested is the spin: a loaded machine must not make it stand down.
        r.set_poll_stand_down(false);
        r.set_poll(PollParams { max: Duration::from_millis(2), grow: 2, shrink: 0 });
        let (rd, wr) = pipe().unwrap();
        let rd = Rc::new(rd);
        // "Work" that the fd never signals: a flag, as a shared-memory ring would be.
        let work = Rc::new(Cell::new(false));
        let (reads, readies, modes) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)), Rc::new(Cell::new(Vec::new())));
        let (rd2, reads2, work2, work3, readies2, modes2) =
            (rd.clone(), reads.clone(), work.clone(), work.clone(), readies.clone(), modes.clone());
        let id = r
            .add_fd(
                rd.as_raw_fd(),
                FdHandler::new()
                    .on_read(move |_, _| {
                        reads2.set(reads2.get() + 1);
                        let mut b = [0u8; 8];
                        read_fd(&rd2, &mut b);
                    })
                    .on_poll(move |_, _| work2.get())
                    .on_poll_ready(move |_, _| {
                        readies2.set(readies2.get() + 1);
                        work3.set(false);
                    })
                    .on_poll_mode(move |_, _, on| {
                        let mut v = modes2.take();
                        v.push(on);
                        modes2.set(v);
                    }),
            )
            .unwrap();
        // An event makes the handler "recently active", hence polled.
        write_fd(&wr, b"x");
        assert!(r.poll(true));
        assert_eq!(reads.get(), 1);
        grow_to(r, Duration::from_micros(100), Duration::from_micros(64));
        // Up to 5 tries: on a loaded machine the loop may find its CPU shared and wait for the
        // timer instead of spinning.
        let t = r.timer(|_| {});
        let (mut by_spinning, mut found) = (false, 0);
        for _ in 0..5 {
            let hits = r.stats().poll_hits;
            work.set(true);
            let t0 = Instant::now();
            t.arm_after(Duration::from_millis(50));
            r.poll(false); // lets the reactor pick up the deadline (armed outside a poll)
            while work.get() && t0.elapsed() < Duration::from_secs(2) {
                r.poll(true);
            }
            if !work.get() {
                found += 1;
            }
            if t0.elapsed() < Duration::from_millis(50) && r.stats().poll_hits > hits {
                by_spinning = true;
                break;
            }
            grow_to(r, Duration::from_micros(100), Duration::from_micros(64));
        }
        assert!(by_spinning, "found by spinning, not by the timer: {:?}", r.stats());
        t.cancel();
        assert_eq!(readies.get(), found, "poll_ready ran once per time the work was found");
        assert_eq!(reads.get(), 1, "the read callback did not");
        assert!(!work.get());
        // Poll mode was entered, and left only when the loop blocked.
        let m = modes.take();
        assert!(m.first() == Some(&true), "{m:?}");
        assert!(m.windows(2).all(|w| w[0] != w[1]), "alternates: {m:?}");
        r.remove_fd(id).unwrap();
        flush(r);
    }

    fn a_cross_thread_schedule_is_seen_while_spinning_without_an_eventfd_write(r: &Reactor) {
        let _serial = serial();
        // A CPU whenever the loop wants one, on a busy machine too.
        let _rt = RealTime::enter();
        // What is tested is the spin: a loaded machine must not make it stand down.
        r.set_poll_stand_down(false);
        // A long poll window, and a pollable handler whose poll-mode callback tells the other
        // thread that the reactor is spinning.
        r.set_poll(PollParams { max: Duration::from_millis(200), grow: 16, shrink: 0 });
        let spinning = Arc::new(AtomicBool::new(false));
        let (rd, wr) = pipe().unwrap();
        let rd = Rc::new(rd);
        let (rd2, sp2) = (rd.clone(), spinning.clone());
        let id = r
            .add_fd(
                rd.as_raw_fd(),
                FdHandler::new()
                    .on_read(move |_, _| {
                        let mut b = [0u8; 8];
                        read_fd(&rd2, &mut b);
                    })
                    .on_poll(|_, _| false)
                    .on_poll_mode(move |_, _, on| sp2.store(on, Ordering::SeqCst)),
            )
            .unwrap();
        write_fd(&wr, b"x");
        r.poll(true);
        grow_to(r, Duration::from_millis(20), Duration::from_millis(50));
        let ran = Arc::new(AtomicBool::new(false));
        let ran2 = ran.clone();
        let bh = Arc::new(r.bh(move |_| ran2.store(true, Ordering::SeqCst)));
        let t = r.timer(|_| {});
        // Up to 5 tries: on a loaded machine the loop may find its CPU shared and wait
        // instead of spinning (then the producer's schedule wakes it by a system call, or the
        // producer gives up waiting for the spin and schedules anyway).
        let mut seen_spinning = false;
        for _ in 0..5 {
            ran.store(false, Ordering::SeqCst);
            let (bh2, sp3) = (bh.clone(), spinning.clone());
            let before = r.stats();
            let producer = std::thread::spawn(move || {
                let _rt = RealTime::enter();
                let give_up = Instant::now() + Duration::from_secs(1);
                while !sp3.load(Ordering::SeqCst) && Instant::now() < give_up {
                    std::hint::spin_loop();
                }
                bh2.schedule();
            });
            t.arm_after(Duration::from_secs(5));
            while !ran.load(Ordering::SeqCst) {
                r.poll(true);
            }
            producer.join().unwrap();
            let after = r.stats();
            if after.wakeups() == before.wakeups() && after.poll_hits > before.poll_hits {
                seen_spinning = true;
                break;
            }
            grow_to(r, Duration::from_millis(20), Duration::from_millis(50));
        }
        assert!(seen_spinning, "never seen by a spin without a system call: {:?}", r.stats());
        t.cancel();
        r.remove_fd(id).unwrap();
        flush(r);
    }
}
