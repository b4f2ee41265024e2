//! `io_uring_enter` through a registered ring fd (`IORING_REGISTER_RING_FDS`, Linux 5.18):
//! the kernel then finds the ring by an index into the thread's own table instead of looking
//! the fd up (and taking and dropping a reference to its file) on every call. Measured in the
//! bench's `ring-nop` scenario, where that lookup was about 5% of a reactor iteration.
//!
//! The io-uring crate can register the fd, but only its short-lived `Submitter` remembers the
//! index, and `IoUring::submitter()` makes a new one for each call; so the ring's hot waits
//! enter the kernel here. Where registration fails (an older kernel, the thread's table of 16
//! full), every call goes through the crate with the plain fd, as before.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::IoUring;
use io_uring::squeue::EntryMarker;

const IORING_REGISTER_RING_FDS: libc::c_long = 20;
const IORING_UNREGISTER_RING_FDS: libc::c_long = 21;
const IORING_ENTER_GETEVENTS: u32 = 1 << 0;
const IORING_ENTER_EXT_ARG: u32 = 1 << 3;
const IORING_ENTER_REGISTERED_RING: u32 = 1 << 4;

/// `struct io_uring_rsrc_update`.
#[repr(C)]
struct RsrcUpdate {
    offset: u32,
    resv: u32,
    data: u64,
}

/// `struct __kernel_timespec`.
#[repr(C)]
struct KernelTimespec {
    tv_sec: i64,
    tv_nsec: i64,
}

/// `struct io_uring_getevents_arg`.
#[repr(C)]
struct GeteventsArg {
    sigmask: u64,
    sigmask_sz: u32,
    min_wait_usec: u32,
    ts: u64,
}

/// How the ring is entered: by its registered index, or through the crate with its fd.
#[derive(Debug)]
pub(crate) struct Enter {
    index: Option<u32>,
}

impl Enter {
    /// Registers `ring`'s fd with the calling thread (which must be the only one to enter it).
    pub(crate) fn register<S: EntryMarker>(ring: &IoUring<S>) -> Enter {
        let mut up = RsrcUpdate {
            offset: u32::MAX, // any free slot
            resv: 0,
            data: ring.as_raw_fd() as u64,
        };
        // SAFETY: the kernel reads and writes one `io_uring_rsrc_update` during the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                ring.as_raw_fd(),
                IORING_REGISTER_RING_FDS,
                std::ptr::from_mut(&mut up),
                1,
            )
        };
        Enter {
            index: (rc == 1).then_some(up.offset),
        }
    }

    /// Whether the ring is entered by its registered index.
    pub(crate) fn registered(&self) -> bool {
        self.index.is_some()
    }

    /// Gives the registration back (at the ring's drop, on the same thread).
    pub(crate) fn unregister<S: EntryMarker>(&mut self, ring: &IoUring<S>) {
        if let Some(offset) = self.index.take() {
            let mut up = RsrcUpdate {
                offset,
                resv: 0,
                data: 0,
            };
            // SAFETY: as in `register`. A failure leaves a slot of the thread's table taken
            // until the thread exits; nothing else depends on it.
            unsafe {
                libc::syscall(
                    libc::SYS_io_uring_register,
                    ring.as_raw_fd(),
                    IORING_UNREGISTER_RING_FDS,
                    std::ptr::from_mut(&mut up),
                    1,
                )
            };
        }
    }

    /// Submits what is queued, without waiting (`IoUring::submit`).
    pub(crate) fn submit<S: EntryMarker>(&self, ring: &mut IoUring<S>) -> io::Result<usize> {
        match self.index {
            None => ring.submit(),
            Some(i) => enter(ring, i, 0, None),
        }
    }

    /// Submits what is queued and waits for one completion, up to `timeout` if given
    /// (`submit_and_wait(1)`, or `submit_with_args` with a timespec).
    pub(crate) fn submit_and_wait<S: EntryMarker>(
        &self,
        ring: &mut IoUring<S>,
        timeout: Option<std::time::Duration>,
    ) -> io::Result<usize> {
        match (self.index, timeout) {
            (None, None) => ring.submit_and_wait(1),
            (None, Some(t)) => {
                let ts = io_uring::types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = io_uring::types::SubmitArgs::new().timespec(&ts);
                ring.submitter().submit_with_args(1, &args)
            }
            (Some(i), t) => enter(ring, i, 1, t),
        }
    }
}

/// One `io_uring_enter` by registered index `index`: submits everything queued, and waits for
/// `want` completions up to `timeout`. Asks for completion work to be run (GETEVENTS) when
/// waiting, and when the ring flags an overflow or pending task work, as the crate does.
fn enter<S: EntryMarker>(
    ring: &mut IoUring<S>,
    index: u32,
    want: u32,
    timeout: Option<std::time::Duration>,
) -> io::Result<usize> {
    let (len, overflow, taskrun) = {
        let sq = ring.submission();
        (sq.len() as u32, sq.cq_overflow(), sq.taskrun())
    };
    let mut flags = IORING_ENTER_REGISTERED_RING;
    if want > 0 || overflow || taskrun {
        flags |= IORING_ENTER_GETEVENTS;
    }
    let ts;
    let arg;
    let (argp, argsz) = match timeout {
        None => (std::ptr::null::<libc::c_void>(), 0usize),
        Some(t) => {
            ts = KernelTimespec {
                tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(t.subsec_nanos()),
            };
            arg = GeteventsArg {
                sigmask: 0,
                sigmask_sz: 8, // _NSIG / 8: checked by the kernel even without a mask
                min_wait_usec: 0,
                ts: std::ptr::from_ref(&ts) as u64,
            };
            flags |= IORING_ENTER_EXT_ARG;
            (
                std::ptr::from_ref(&arg).cast(),
                std::mem::size_of::<GeteventsArg>(),
            )
        }
    };
    // SAFETY: `argp` is null or points to a `GeteventsArg` (whose `ts` points to a timespec)
    // that lives until the call returns; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_enter,
            index,
            len,
            want,
            flags,
            argp,
            argsz,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

#[cfg(test)]
mod tests {
    use crate::Uring;
    use std::time::{Duration, Instant};

    #[test]
    fn waits_work_by_registered_index_and_beyond_the_thread_table() {
        // More rings than a thread can register (16): the first ones enter by index, the rest
        // by fd, and every one waits, times out and completes alike.
        let mut rings: Vec<Uring> = (0..20).map(|_| Uring::new(8).unwrap()).collect();
        assert!(
            rings[0].ring_fd_registered(),
            "Linux 5.18+ registers ring fds"
        );
        assert!(
            !rings[19].ring_fd_registered(),
            "a thread registers at most 16"
        );
        for u in &mut rings {
            let t0 = Instant::now();
            assert_eq!(u.wait(Some(Duration::from_millis(5)), |_| {}).unwrap(), 0);
            assert!(
                t0.elapsed() >= Duration::from_millis(4),
                "the timeout was kept"
            );
            // SAFETY: a NOP refers to no memory.
            unsafe { u.push(io_uring::opcode::Nop::new().build(), 7) }.unwrap();
            let mut got = Vec::new();
            u.wait(None, |e| got.push(e)).unwrap();
            assert_eq!(
                got,
                [crate::Event::Complete {
                    token: 7,
                    result: 0,
                    flags: 0
                }]
            );
        }
        // Dropping gives the slots back: a new ring registers again.
        drop(rings);
        assert!(Uring::new(8).unwrap().ring_fd_registered());
    }
}
