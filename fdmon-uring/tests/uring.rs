//! Behaviour of the io_uring fd monitor against a real kernel.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use fdmon_uring::io_uring::{opcode, types};
use fdmon_uring::{Event, MAX_USER_TOKEN, POLLIN, POLLOUT, Uring};

fn ring() -> Uring {
    Uring::new(64).expect("io_uring must be available on this machine")
}

fn collect(r: &mut Uring, t: Option<Duration>) -> Vec<Event> {
    let mut v = Vec::new();
    r.wait(t, |e| v.push(e)).unwrap();
    v
}

/// A zero wait with nothing queued only reads the completion ring: it still sees a completion
/// the kernel posted after the POLL_ADD went in. (That it makes no system call is checked by
/// the reactor's syscall-counting test.)
#[test]
fn zero_wait_with_nothing_queued_reads_only_the_ring() {
    let mut r = ring();
    let (a, mut b) = UnixStream::pair().unwrap();
    r.update(a.as_raw_fd(), 1, 0, POLLIN).unwrap();
    assert!(r.need_wait(), "a staged registration needs a wait");
    assert!(collect(&mut r, Some(Duration::ZERO)).is_empty());
    assert!(!r.need_wait(), "the POLL_ADD was submitted");
    b.write_all(b"x").unwrap();
    // The completion is posted by the kernel without any further submission from us.
    let t0 = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && t0.elapsed() < Duration::from_secs(5) {
        got = collect(&mut r, Some(Duration::ZERO));
    }
    assert_eq!(
        got,
        vec![Event::Ready {
            token: 1,
            events: POLLIN
        }]
    );
}

#[test]
fn level_triggered_by_rearming() {
    let mut r = ring();
    let (mut a, mut b) = UnixStream::pair().unwrap();
    r.update(a.as_raw_fd(), 5, 0, POLLIN).unwrap();
    b.write_all(b"ab").unwrap();
    for _ in 0..3 {
        assert_eq!(
            collect(&mut r, Some(Duration::from_secs(1))),
            vec![Event::Ready {
                token: 5,
                events: POLLIN
            }]
        );
    }
    let mut buf = [0; 2];
    a.read_exact(&mut buf).unwrap();
    // The re-armed poll finds nothing now.
    assert!(collect(&mut r, Some(Duration::from_millis(10))).is_empty());
}

#[test]
fn timed_wait_is_not_early() {
    let mut r = ring();
    let t0 = Instant::now();
    assert!(collect(&mut r, Some(Duration::from_micros(1500))).is_empty());
    let took = t0.elapsed();
    assert!(took >= Duration::from_micros(1500), "{took:?}");
}

#[test]
fn modify_changes_interest_and_token() {
    let mut r = ring();
    let (a, _b) = UnixStream::pair().unwrap();
    let fd = a.as_raw_fd();
    r.update(fd, 1, 0, POLLIN).unwrap();
    assert!(collect(&mut r, Some(Duration::from_millis(5))).is_empty());
    r.update(fd, 2, POLLIN, POLLOUT).unwrap();
    let evs = collect(&mut r, Some(Duration::from_secs(1)));
    // The cancelled POLL_ADD comes back with -ECANCELED (not reported); the re-arm with POLLOUT
    // completes on the next wait.
    let evs = if evs.is_empty() {
        collect(&mut r, Some(Duration::from_secs(1)))
    } else {
        evs
    };
    assert_eq!(
        evs,
        vec![Event::Ready {
            token: 2,
            events: POLLOUT
        }]
    );
}

#[test]
fn removal_keeps_the_slot_until_the_poll_returns() {
    let mut r = ring();
    let (a, mut b) = UnixStream::pair().unwrap();
    let fd = a.as_raw_fd();
    r.update(fd, 1, 0, POLLIN).unwrap();
    collect(&mut r, Some(Duration::ZERO));
    r.update(fd, 1, POLLIN, 0).unwrap();
    assert_eq!(r.registrations(), 0);
    assert_eq!(r.slots(), 1);
    // The fd can be registered again at once, under a new slot.
    r.update(fd, 2, 0, POLLIN).unwrap();
    b.write_all(b"x").unwrap();
    let mut got = Vec::new();
    for _ in 0..10 {
        got.extend(collect(&mut r, Some(Duration::from_millis(100))));
        if r.slots() == 1 && !got.is_empty() {
            break;
        }
    }
    assert!(
        got.iter().all(|e| *e
            == Event::Ready {
                token: 2,
                events: POLLIN
            }),
        "{got:?}"
    );
    assert!(!got.is_empty());
    assert_eq!(
        r.slots(),
        1,
        "the removed slot was freed when its POLL_ADD came back"
    );
}

#[test]
fn errors_match_epoll() {
    let mut r = ring();
    assert_eq!(
        r.update(-1, 1, 0, POLLIN).unwrap_err().raw_os_error(),
        Some(libc::EBADF)
    );
    assert_eq!(
        r.update(3333, 1, POLLIN, 0).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    let (a, _b) = UnixStream::pair().unwrap();
    r.update(a.as_raw_fd(), 1, 0, POLLIN).unwrap();
    assert_eq!(
        r.update(a.as_raw_fd(), 1, 0, POLLIN)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EEXIST)
    );
    assert_eq!(
        r.update(a.as_raw_fd(), 1, POLLIN, 1 << 29)
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::InvalidInput
    );
}

#[test]
fn user_sqes_complete_by_token() {
    let mut r = ring();
    let nop = opcode::Nop::new().build();
    // SAFETY: NOP refers to no memory.
    unsafe { r.push(nop.clone(), 42).unwrap() };
    // SAFETY: as above.
    let e = unsafe { r.push(nop, MAX_USER_TOKEN + 1) }.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    let evs = collect(&mut r, Some(Duration::from_secs(1)));
    assert_eq!(
        evs,
        vec![Event::Complete {
            token: 42,
            result: 0,
            flags: 0
        }]
    );
}

#[test]
fn a_full_submission_queue_and_an_overflowing_completion_queue_lose_nothing() {
    // 8 SQ slots and 16 CQ slots; push 1000 NOPs and a read of a pipe.
    let mut r = Uring::new(8).unwrap();
    for i in 0..1000u64 {
        let nop = opcode::Nop::new().build();
        // SAFETY: NOP refers to no memory.
        unsafe { r.push(nop, i).unwrap() };
    }
    let mut seen = vec![false; 1000];
    let mut n = 0;
    let t0 = Instant::now();
    while n < 1000 && t0.elapsed() < Duration::from_secs(10) {
        r.wait(Some(Duration::from_millis(10)), |e| {
            let Event::Complete { token, result, .. } = e else {
                panic!("{e:?}")
            };
            assert_eq!(result, 0);
            assert!(!seen[token as usize], "token {token} twice");
            seen[token as usize] = true;
            n += 1;
        })
        .unwrap();
    }
    assert_eq!(n, 1000);
}

#[test]
fn a_busy_kernel_gets_a_bounded_backlog_then_would_block() {
    // 4 SQ slots. The kernel is busy (EBUSY, injected) when the fifth push submits to make
    // room: SQEs wait in the backlog, up to as many as the submission queue holds; the next
    // one is refused with WouldBlock, except an unbounded one (a cancellation).
    let mut r = Uring::new(4).unwrap();
    let sq = r.ring().params().sq_entries() as u64;
    r.inject_errors(libc::EBUSY, 1);
    let nop = || opcode::Nop::new().build();
    for i in 0..2 * sq {
        // SAFETY: NOP refers to no memory.
        unsafe { r.push(nop(), i) }.unwrap();
    }
    assert_eq!(r.backlog(), sq as usize);
    assert!(r.backlog_full());
    // SAFETY: as above.
    let e = unsafe { r.push(nop(), 99) }.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    // SAFETY: as above.
    unsafe { r.push_unbounded(nop(), 2 * sq) }.unwrap();
    // A wait submits the backlog: every SQE completes once, and there is room again.
    let mut seen = vec![false; 2 * sq as usize + 1];
    let t0 = Instant::now();
    while seen.iter().any(|s| !s) && t0.elapsed() < Duration::from_secs(10) {
        r.wait(Some(Duration::from_millis(10)), |e| {
            let Event::Complete { token, .. } = e else {
                panic!("{e:?}")
            };
            assert!(!seen[token as usize], "token {token} twice");
            seen[token as usize] = true;
        })
        .unwrap();
    }
    assert!(seen.iter().all(|s| *s), "every SQE completed");
    assert_eq!(r.backlog(), 0);
    // SAFETY: as above.
    unsafe { r.push(nop(), 0) }.unwrap();
}

#[test]
fn a_short_submission_is_retried() {
    // A read on an invalid fd fails at submission time; the SQEs after it must still go in.
    let mut r = ring();
    let mut buf = [0u8; 8];
    let bad = opcode::Read::new(types::Fd(-1), buf.as_mut_ptr(), 8).build();
    // SAFETY: `buf` outlives the wait below, which reaps the completion.
    unsafe { r.push(bad, 1).unwrap() };
    for t in 2..6 {
        // SAFETY: NOP refers to no memory.
        unsafe { r.push(opcode::Nop::new().build(), t).unwrap() };
    }
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < 5 && t0.elapsed() < Duration::from_secs(5) {
        got.extend(collect(&mut r, Some(Duration::from_millis(10))));
    }
    got.sort_by_key(|e| match e {
        Event::Complete { token, .. } => *token,
        Event::Ready { .. } => u64::MAX,
    });
    assert_eq!(got.len(), 5, "{got:?}");
    assert!(matches!(got[0], Event::Complete { token: 1, result, .. } if result == -libc::EBADF));
}

#[test]
fn eintr_is_retried_with_the_remaining_time() {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: installing a no-op handler for SIGUSR1 without SA_RESTART, so the wait sees EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = nothing as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as usize;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let killer = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: the target thread is alive until `stop` is set and this thread joined.
            unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let mut r = ring();
    let t0 = Instant::now();
    let evs = collect(&mut r, Some(Duration::from_millis(50)));
    let took = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    killer.join().unwrap();
    assert!(evs.is_empty());
    assert!(
        took >= Duration::from_millis(50),
        "returned early after {took:?}"
    );
}

#[test]
fn a_registration_follows_its_file_not_its_number() {
    use std::os::fd::{FromRawFd, OwnedFd};
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for two descriptors.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: fresh descriptors owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }
    let mut r = ring();
    assert!(
        r.free_fixed_files() > 0,
        "this kernel has sparse fixed-file tables"
    );
    let (a_rd, a_wr) = pipe();
    let n = a_rd.as_raw_fd();
    r.update(n, 1, 0, POLLIN).unwrap();
    assert!(collect(&mut r, Some(Duration::ZERO)).is_empty());
    // The caller closes the registered fd without removing it, and the number is reused by
    // another pipe's read end, which then becomes readable.
    let (b_rd, b_wr) = pipe();
    drop(a_rd);
    // SAFETY: dup2 onto the number just freed; `b_rd` stays the owner of its own fd.
    assert_eq!(unsafe { libc::dup2(b_rd.as_raw_fd(), n) }, n);
    // SAFETY: `n` now owns a duplicate of B's read end.
    let b_dup = unsafe { OwnedFd::from_raw_fd(n) };
    // SAFETY: writes one byte from a live buffer.
    let written = unsafe { libc::write(b_wr.as_raw_fd(), b"x".as_ptr().cast(), 1) };
    assert_eq!(written, 1);
    for _ in 0..3 {
        let evs = collect(&mut r, Some(Duration::from_millis(5)));
        assert!(
            evs.is_empty(),
            "pipe B's data was reported to pipe A's registration: {evs:?}"
        );
    }
    // A's own hang-up still reaches A's registration.
    drop(a_wr);
    let evs = collect(&mut r, Some(Duration::from_secs(1)));
    assert!(
        matches!(evs[..], [Event::Ready { token: 1, events }] if events & fdmon_uring::POLLHUP != 0),
        "{evs:?}"
    );
    // Re-armed after that completion, the poll still watches A's file (hang-up again), not
    // whatever the number names now (B, readable).
    for _ in 0..3 {
        for ev in collect(&mut r, Some(Duration::from_millis(5))) {
            let Event::Ready { token: 1, events } = ev else {
                panic!("{ev:?}")
            };
            assert_eq!(events & POLLIN, 0, "B's readiness reached A's registration");
        }
    }
    // Removing A's registration (by its number) and registering B under the same number works.
    r.update(n, 1, POLLIN, 0).unwrap();
    r.update(n, 2, 0, POLLIN).unwrap();
    let evs = collect(&mut r, Some(Duration::from_secs(1)));
    assert_eq!(
        evs,
        vec![Event::Ready {
            token: 2,
            events: POLLIN
        }]
    );
    drop((b_dup, b_rd, b_wr));
}
