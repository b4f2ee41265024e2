//! A child process for the resource-limit fault tests (limits are per process, so they cannot
//! be set inside the test binary). `fault-child nofile` or `fault-child memlock` sets the limit,
//! tries to create reactors, and prints one `key=value` line per attempt.

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
        _ => {
            eprintln!("usage: fault-child nofile|memlock");
            std::process::exit(2);
        }
    }
}
