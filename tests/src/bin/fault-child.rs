//! A child process for the fault tests that need a process of their own: resource limits
//! (per process, so they cannot be set inside the test binary) and `fork` (which a
//! multi-threaded test binary must not do). `fault-child nofile` or `fault-child memlock` sets
//! the limit, tries to create reactors, and prints one `key=value` line per attempt;
//! `fault-child fork uring|epoll` forks with a busy reactor and prints what the child and the
//! parent could do with it.

use std::time::Duration;

use reactor::{Backend, Builder};

fn attempt(label: &str, b: Builder) {
    match b.build() {
        Ok(r) => {
            // A working reactor: a one-shot and a timer both run.
            let ran = std::rc::Rc::new(std::cell::Cell::new(false));
            let r2 = ran.clone();
            r.oneshot(move |_| r2.set(true));
            let t = r.timer(|_| {});
            t.arm_after(Duration::from_millis(1));
            r.run_until(|| ran.get() && !t.is_armed());
            println!("{label}=ok:{}", r.backend());
        }
        Err(e) => println!(
            "{label}=err:{}:{}",
            e.raw_os_error().unwrap_or(0),
            e.to_string().replace('\n', " ")
        ),
    }
}

fn set(resource: libc::__rlimit_resource_t, soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain rlimit calls on valid structs.
    unsafe {
        assert_eq!(libc::getrlimit(resource, &mut lim), 0);
        lim.rlim_cur = soft.min(lim.rlim_max);
        assert_eq!(
            libc::setrlimit(resource, &lim),
            0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The lowest `n` free fd numbers.
fn free_fds(n: usize) -> Vec<u64> {
    // SAFETY: dup of stdin returns the lowest free number; each is closed below.
    let fds: Vec<i32> = (0..n).map(|_| unsafe { libc::dup(0) }).collect();
    for &fd in &fds {
        assert!(fd >= 0);
        // SAFETY: closing the duplicates made just above.
        unsafe { libc::close(fd) };
    }
    fds.into_iter().map(|fd| fd as u64).collect()
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("nofile") => {
            // No room for one more fd (fd numbers must stay below the limit): creation must fail
            // cleanly, whatever the backend.
            let free = free_fds(2);
            set(libc::RLIMIT_NOFILE, free[0]);
            attempt("nofile-none-auto", Builder::new());
            attempt("nofile-none-epoll", Builder::new().backend(Backend::Epoll));
            attempt("nofile-none-uring", Builder::new().backend(Backend::Uring));
            // Room for exactly what a reactor needs (its eventfd and the epoll or ring fd).
            set(libc::RLIMIT_NOFILE, free[1] + 1);
            attempt("nofile-two-auto", Builder::new());
            attempt("nofile-two-epoll", Builder::new().backend(Backend::Epoll));
        }
        Some("memlock") => {
            set(libc::RLIMIT_MEMLOCK, 0);
            attempt("memlock-auto", Builder::new());
            attempt("memlock-uring", Builder::new().backend(Backend::Uring));
        }
        Some("fork") => {
            let backend = match std::env::args().nth(2).as_deref() {
                Some("uring") => Backend::Uring,
                _ => Backend::Epoll,
            };
            fork(backend);
        }
        _ => {
            eprintln!("usage: fault-child nofile|memlock|fork [uring|epoll]");
            std::process::exit(2);
        }
    }
}

/// A reactor with an fd registered and a socket read in flight, then `fork()`: the child's
/// uses of it fail with an error that names the fork (or, for `poll`, panic with it), a reactor
/// the child builds works, and the parent's reactor goes on as if nothing happened (its read
/// completes, its fd handler runs). Prints `child-*` and `parent-*` lines.
fn fork(backend: Backend) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let r = Builder::new().backend(backend).build().expect("reactor");
    let (rd, wr) = std::os::unix::net::UnixStream::pair().unwrap();
    rd.set_nonblocking(true).unwrap();
    let fired = std::rc::Rc::new(std::cell::Cell::new(0u32));
    let f2 = fired.clone();
    let fd = rd.as_raw_fd();
    let id = r
        .add_fd(
            fd,
            reactor::FdHandler::new().on_read(move |_, _| f2.set(f2.get() + 1)),
        )
        .unwrap();
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let got = std::rc::Rc::new(std::cell::RefCell::new(None));
    let g2 = got.clone();
    r.block_on(async {
        let a = reactor::net::UnixStream::from_std(a).unwrap();
        reactor::Reactor::with_current(|r| {
            r.spawn_local(async move {
                let (res, buf) = a.read(Vec::with_capacity(16)).await;
                *g2.borrow_mut() = Some((res.map_err(|e| e.to_string()), buf));
            })
            .detach()
        });
    });
    for _ in 0..3 {
        r.poll(false);
    }
    let _ = std::io::stdout().flush();
    // SAFETY: this program has one thread here; the child only uses what it owns and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let said = |key: &str, res: std::io::Result<()>| match res {
            Ok(()) => println!("{key}=ok"),
            Err(e) => println!("{key}=err:{}", e.to_string().replace('\n', " ")),
        };
        said("child-try-poll", r.try_poll(false).map(drop));
        said(
            "child-add-fd",
            r.add_fd(fd, reactor::FdHandler::new().on_read(|_, _| {}))
                .map(drop),
        );
        said("child-remove-fd", r.remove_fd(id));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.poll(false)));
        match panicked {
            Ok(_) => println!("child-poll=returned"),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "?".into());
                println!("child-poll=panicked:{}", msg.replace('\n', " "));
            }
        }
        drop(r);
        let fresh = Builder::new()
            .backend(backend)
            .build()
            .expect("a reactor built in the child");
        let ran = std::rc::Rc::new(std::cell::Cell::new(false));
        let r2 = ran.clone();
        fresh.oneshot(move |_| r2.set(true));
        fresh.run_until(|| ran.get());
        println!("child-new-reactor=ok:{}", fresh.backend());
        let _ = std::io::stdout().flush();
        // SAFETY: ends the child without running the parent's exit handlers twice.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    println!("child-exit={}", libc::WEXITSTATUS(status));
    // The parent's reactor, untouched by the child: the fd and the read still work.
    (&wr).write_all(b"x").unwrap();
    b.write_all(b"after fork").unwrap();
    let t0 = std::time::Instant::now();
    while (fired.get() == 0 || got.borrow().is_none()) && t0.elapsed() < Duration::from_secs(10) {
        r.poll(true);
    }
    println!("parent-fd-handler-ran={}", fired.get() > 0);
    match got.borrow().as_ref() {
        Some((Ok(n), buf)) => println!("parent-read={}", String::from_utf8_lossy(&buf[..*n])),
        Some((Err(e), _)) => println!("parent-read=err:{e}"),
        None => println!("parent-read=none"),
    }
    r.remove_fd(id).unwrap();
    drop(rd);
}
