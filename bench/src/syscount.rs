//! System calls counted by the kernel, for the `sc/op` column.
//!
//! The count is the `raw_syscalls:sys_enter` tracepoint as a counting perf event: no
//! sampling, no buffer, one number per thread that the kernel increments on every system call
//! entry. A [`Section`] opens one such counter per thread of this process (every thread in
//! `/proc/self/task`), each inherited by the threads that thread creates later, so the count
//! covers every thread of the system under test, whoever made the call: the reactor's loop,
//! its wakers, tokio's threads, a floor's two threads alike.
//!
//! Counting is not free: while such a counter is open, every system call on the machine goes
//! through the tracepoint's slow path (a few hundred ns more on this VM). So the timed runs
//! are never counted: a scenario that shows `sc/op` makes one more run of each system, with
//! the counters open, after its timed runs ([`Ctx::interleave`](crate::scenarios::Ctx)), and
//! that run gives the column only.
//!
//! The counters need `perf_event_open` on this process (root, or `perf_event_paranoid` ≤ 1
//! with `CAP_PERFMON`) and the tracepoint's id from tracefs, which is mounted at
//! `/sys/kernel/tracing` when it is not yet (root). Where any of it fails, [`available`] says
//! why and the column is left empty.
//!
//! `BENCH_SYSCALL_MARKERS=1` brackets each counted section with two marker calls
//! (`write(-1, "bench-sc-begin")`, `write(-1, "bench-sc-end")`) and prints the count
//! (`bench-syscount N`) on stderr, so that a tracer outside the process (`strace -f`) can count
//! the same section and be compared (`bench/tests/syscount.rs`).

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

const PERF_TYPE_TRACEPOINT: u32 = 2;
const ATTR_DISABLED: u64 = 1 << 0;
const ATTR_INHERIT: u64 = 1 << 1;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// `_IO('$', 0)` and `_IO('$', 1)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;

/// `struct perf_event_attr` up to `config3` (`PERF_ATTR_SIZE_VER8`, 136 bytes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
    aux_sample_size: u32,
    reserved_3: u32,
    sig_data: u64,
    config3: u64,
}

const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == 136);

const EVENT_ID: &str = "events/raw_syscalls/sys_enter/id";

/// The tracepoint's id, from a tracefs that is mounted or that this process mounts.
fn sys_enter_id() -> Result<u64, String> {
    let read = || {
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .find_map(|d| std::fs::read_to_string(format!("{d}/{EVENT_ID}")).ok())
            .and_then(|s| s.trim().parse().ok())
    };
    if let Some(id) = read() {
        return Ok(id);
    }
    // SAFETY: static C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "no tracefs with {EVENT_ID}, and mounting one failed: {}",
            io::Error::last_os_error()
        ));
    }
    read()
        .ok_or_else(|| format!("tracefs has no {EVENT_ID} (a kernel without syscall tracepoints)"))
}

/// A disabled counter of `tid`'s system calls, inherited by the threads it creates.
fn counter(id: u64, tid: libc::pid_t) -> io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        type_: PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: id,
        flags: ATTR_DISABLED | ATTR_INHERIT,
        ..Default::default()
    };
    // SAFETY: `attr` is a complete perf_event_attr of the size it states, live for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            tid,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One counter per thread of this process: this thread's apart, so that it is enabled last
/// and disabled last, and the section's own requests are known (see [`Section::finish`]).
struct Counters {
    mine: OwnedFd,
    others: Vec<OwnedFd>,
}

impl Counters {
    fn open(id: u64) -> io::Result<Counters> {
        // SAFETY: gettid takes nothing and cannot fail.
        let me = unsafe { libc::gettid() };
        let mut others = Vec::new();
        for e in std::fs::read_dir("/proc/self/task")? {
            let tid: libc::pid_t = e?
                .file_name()
                .to_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::other("a /proc/self/task entry that is no thread id"))?;
            if tid == me {
                continue;
            }
            match counter(id, tid) {
                Ok(fd) => others.push(fd),
                // A thread that ended since the listing makes no more calls.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Counters {
            mine: counter(id, me)?,
            others,
        })
    }

    fn ioctl(fd: &OwnedFd, request: libc::c_ulong) {
        // SAFETY: an enable or disable request on a perf event fd; no argument.
        unsafe { libc::ioctl(fd.as_raw_fd(), request, 0) };
    }

    /// Starts counting: the other threads first, this one last (its own requests before are
    /// not counted).
    fn enable(&self) {
        for fd in &self.others {
            Self::ioctl(fd, PERF_EVENT_IOC_ENABLE);
        }
        Self::ioctl(&self.mine, PERF_EVENT_IOC_ENABLE);
    }

    /// Stops counting on the other threads (this thread counts these requests of its own).
    fn disable_others(&self) {
        for fd in &self.others {
            Self::ioctl(fd, PERF_EVENT_IOC_DISABLE);
        }
    }

    /// Stops counting on this thread (it counts this one request too).
    fn disable_mine(&self) {
        Self::ioctl(&self.mine, PERF_EVENT_IOC_DISABLE);
    }

    fn total(&self) -> u64 {
        std::iter::once(&self.mine)
            .chain(&self.others)
            .map(|fd| {
                let mut v = 0u64;
                // SAFETY: reads one u64 (read_format 0) into a live local.
                let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut v).cast(), 8) };
                assert_eq!(
                    n,
                    8,
                    "read of a perf counter: {}",
                    io::Error::last_os_error()
                );
                v
            })
            .sum()
    }
}

/// Whether system calls can be counted here (checked once: a section of 1,000 `getppid`
/// calls must count 1,000 and a few); the reason when they cannot.
pub fn available() -> Result<u64, String> {
    static CHECKED: OnceLock<Result<u64, String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let id = sys_enter_id()?;
            let c = Counters::open(id).map_err(|e| format!("perf_event_open: {e}"))?;
            c.enable();
            for _ in 0..1000 {
                // SAFETY: getppid takes nothing and cannot fail.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
            c.disable_others();
            c.disable_mine();
            let n = c.total();
            // 1,000 calls, the requests that stop counting, and whatever other threads made.
            if !(1001..=1100).contains(&n) {
                return Err(format!(
                    "the counter saw {n} system calls in a section of 1,000 (an unprivileged counter counts none)"
                ));
            }
            Ok(id)
        })
        .clone()
}

thread_local! {
    /// Set for the run that counts (see the module docs).
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

/// Makes the [`Section`]s of `f` count; returns what `f` returns.
pub fn counting<R>(f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            COUNTING.with(|c| c.set(false));
        }
    }
    COUNTING.with(|c| c.set(true));
    let _reset = Reset;
    f()
}

fn markers() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("BENCH_SYSCALL_MARKERS").is_some_and(|v| v == "1"))
}

fn marker(text: &[u8]) {
    // SAFETY: a write of a live buffer to fd -1: it fails with EBADF and does nothing but show
    // in a tracer's log.
    unsafe { libc::write(-1, text.as_ptr().cast(), text.len()) };
}

/// A measured section: counts every system call of this process's threads between
/// [`start`](Self::start) and [`finish`](Self::finish), when the run counts.
pub struct Section(Option<Counters>);

impl Section {
    /// Starts counting if this is the counting run (and counting works here); else nothing.
    pub fn start() -> Section {
        if !COUNTING.with(Cell::get) {
            return Section(None);
        }
        let Ok(id) = available() else {
            return Section(None);
        };
        let c = Counters::open(id).expect("perf_event_open worked for the check");
        c.enable();
        if markers() {
            marker(b"bench-sc-begin");
        }
        Section(Some(c))
    }

    /// The system calls made since `start`, if counted, less the section's own: the requests
    /// that stop counting (one per counter: the other threads' first, then this one's), or
    /// with markers the two markers and this thread's last request (strace sees the others
    /// between the markers, so they stay in the count that is compared with it).
    pub fn finish(self) -> Option<u64> {
        let c = self.0?;
        c.disable_others();
        if markers() {
            marker(b"bench-sc-end");
        }
        c.disable_mine();
        let own = if markers() {
            3
        } else {
            1 + c.others.len() as u64
        };
        let n = c.total().saturating_sub(own);
        if markers() {
            eprintln!("bench-syscount {n}");
        }
        Some(n)
    }
}
