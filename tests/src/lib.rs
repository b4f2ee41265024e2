//! Helpers for the conformance suite: every test runs once per backend.
//!
//! [`backend_tests!`] turns each `fn name(r: &Reactor) { ... }` into `uring::name` and
//! `epoll::name` tests (for the backends the crate's features build). Each gets a reactor that
//! is forced onto its backend; a backend that cannot be created here fails the test loudly.

pub mod seccomp;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub use reactor::{Backend, Reactor};

/// A reactor on `backend` whose sockets use multishot receives and accepts
/// (`SocketIo::Multishot`; readiness on epoll).
pub fn multishot_on(backend: Backend) -> Reactor {
    let r = Reactor::builder()
        .backend(backend)
        .socket_io(reactor::net::SocketIo::Multishot)
        .build()
        .unwrap_or_else(|e| panic!("the {backend} backend cannot be created on this machine: {e}"));
    assert_eq!(r.backend(), backend, "forced backend must be used");
    assert_eq!(r.socket_io(), reactor::net::SocketIo::Multishot);
    r
}

/// A reactor on `backend`, or a panic that says why it could not be created.
pub fn reactor_on(backend: Backend) -> Reactor {
    match Reactor::builder().backend(backend).build() {
        Ok(r) => {
            assert_eq!(r.backend(), backend, "forced backend must be used");
            r
        }
        Err(e) => panic!("the {backend} backend cannot be created on this machine: {e}"),
    }
}

/// Defines each test once per built backend, in modules named after the backend.
#[macro_export]
macro_rules! backend_tests {
    ($($(#[$meta:meta])* fn $name:ident($r:ident : &Reactor) $body:block)*) => {
        #[cfg(feature = "uring")]
        mod uring {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    let reactor = $crate::reactor_on($crate::Backend::Uring);
                    let $r: &$crate::Reactor = &reactor;
                    $body
                }
            )*
        }
        #[cfg(feature = "epoll")]
        mod epoll {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    let reactor = $crate::reactor_on($crate::Backend::Epoll);
                    let $r: &$crate::Reactor = &reactor;
                    $body
                }
            )*
        }
    };
}

/// A non-blocking pipe: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Writes `data` to `fd` (which must accept it without blocking).
pub fn write_fd(fd: &OwnedFd, data: &[u8]) {
    // SAFETY: reads `data.len()` bytes from a live slice.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    assert_eq!(
        n,
        data.len() as isize,
        "write: {}",
        io::Error::last_os_error()
    );
}

/// Reads what is available from the non-blocking `fd` (0 bytes if nothing).
pub fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    // SAFETY: writes at most `buf.len()` bytes into a live slice.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "read: {e}");
        return 0;
    }
    n as usize
}

/// Pages of the first `len` bytes of the file `fd` names that are in the page cache
/// (`mincore` over a mapping of them).
pub fn resident_pages(fd: &impl AsRawFd, len: usize) -> usize {
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped below; mincore
    // writes one byte per page into a vector that long.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0, "mincore");
        libc::munmap(p, len);
    }
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// Number of open fds of this process. Panics when `/proc/self/fd` cannot be read, rather
/// than returning a count that would make a leak check pass without checking.
///
/// ```
/// let before = tests::open_fds();
/// let f = std::fs::File::open("/proc/self/status").unwrap();
/// assert_eq!(tests::open_fds(), before + 1);
/// drop(f);
/// assert_eq!(tests::open_fds(), before);
/// ```
pub fn open_fds() -> usize {
    // Only numbers below the fd limit the process sees: tools such as valgrind keep their own
    // fds above it, and open and close them as they please.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to write.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        u64::MAX
    };
    // A directory that cannot be read would make every "no fd leaked" check pass: fail.
    let dir = std::fs::read_dir("/proc/self/fd").unwrap_or_else(|e| {
        panic!("open_fds: /proc/self/fd cannot be read ({e}): fd leaks cannot be checked")
    });
    let n = dir
        .map(|e| {
            let e = e.unwrap_or_else(|e| panic!("open_fds: reading /proc/self/fd: {e}"));
            e.file_name()
                .to_str()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("open_fds: {:?} in /proc/self/fd", e.file_name()))
        })
        .filter(|&fd| fd < limit)
        .count();
    // The directory itself is open while it is read, so a live process counts at least that.
    assert!(
        n > 0,
        "open_fds: /proc/self/fd listed no fd: it is not this process's"
    );
    n
}

/// Polls without blocking until no progress is made; returns how many iterations made progress.
pub fn flush(r: &Reactor) -> usize {
    let mut n = 0;
    while r.poll(false) {
        n += 1;
        assert!(n < 1_000_000, "flush does not terminate");
    }
    n
}

/// A one-way flag a future can wait for, set from any thread.
#[derive(Clone, Default)]
pub struct Signal(std::sync::Arc<std::sync::Mutex<(bool, Option<std::task::Waker>)>>);

impl Signal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag and wakes the waiter.
    pub fn set(&self) {
        let w = {
            let mut g = self.0.lock().unwrap();
            g.0 = true;
            g.1.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    pub fn is_set(&self) -> bool {
        self.0.lock().unwrap().0
    }

    /// Waits until the flag is set.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let s = self.clone();
        std::future::poll_fn(move |cx| {
            let mut g = s.0.lock().unwrap();
            if g.0 {
                std::task::Poll::Ready(())
            } else {
                g.1 = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
    }
}

/// Yields once to the reactor (the reactor's own [`reactor::yield_now`]).
pub use reactor::yield_now;

/// The calling thread in a real-time class for the guard's life: it gets a CPU whenever it
/// wants one, ahead of every ordinary thread, so a test of busy polling (a spin must run when
/// the loop would wait, a short wait must stay short, a yield must run the other thread of
/// its CPU) holds on a machine whose CPUs are all busy. The kernel's real-time throttling
/// still leaves ordinary threads 5 % of each CPU. Needs `CAP_SYS_NICE` (root): without it the
/// guard says so on stderr and the test runs as an ordinary thread (it may then fail on a busy
/// machine). Threads of the class on one CPU take turns only when they block or yield.
pub struct RealTime {
    saved: Option<(libc::c_int, libc::sched_param)>,
}

impl RealTime {
    /// `SCHED_FIFO`, priority 1: runs until it blocks or yields.
    pub fn enter() -> RealTime {
        RealTime::with(libc::SCHED_FIFO)
    }

    fn with(policy: libc::c_int) -> RealTime {
        // SAFETY: sched_getscheduler/sched_getparam on this thread (pid 0), into a local.
        let saved = unsafe {
            let mut p: libc::sched_param = std::mem::zeroed();
            libc::sched_getparam(0, &mut p);
            (libc::sched_getscheduler(0), p)
        };
        let rt = libc::sched_param { sched_priority: 1 };
        // SAFETY: sched_setscheduler on this thread with a valid parameter.
        if unsafe { libc::sched_setscheduler(0, policy, &rt) } != 0 {
            eprintln!(
                "RealTime: a real-time class refused ({}): running as an ordinary thread",
                io::Error::last_os_error()
            );
            return RealTime { saved: None };
        }
        RealTime { saved: Some(saved) }
    }
}

impl Drop for RealTime {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.saved {
            // SAFETY: back to the policy and parameter this thread had.
            unsafe { libc::sched_setscheduler(0, policy, &param) };
        }
    }
}

/// xorshift64*: reproducible pseudo-random numbers for tests (sizes, delays, offsets).
pub struct Rng(pub u64);

impl Rng {
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The byte at position `p` of a known byte sequence (period 1,757: a run of bytes lost or
/// repeated shows as a wrong byte, unless its length is a multiple of that, which a count of
/// the bytes then shows).
pub fn sequence_byte(p: u64) -> u8 {
    (p % 251) as u8 ^ (p / 251 % 7) as u8
}
