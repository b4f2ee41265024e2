//! [`Doorbell`]: wakes a ring's waiter from any thread by posting a completion into its ring
//! (a ring message sent with `IORING_REGISTER_SEND_MSG_RING`, Linux 6.13), where an eventfd
//! would take a write by the waker, a poll wakeup run as task work in the waiter, and a read
//! to clear it.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, PoisonError, RwLock};

use io_uring::{opcode, types};

use crate::Uring;
use crate::user_data::DOORBELL;

/// `io_uring_register` opcode: send a `MSG_RING` request described by an SQE, without a ring
/// of one's own (Linux 6.13).
const IORING_REGISTER_SEND_MSG_RING: libc::c_long = 31;

/// Posts a completion that [`Uring::wait`] consumes and does not report: it only ends a wait
/// (blocking or about to block) of the ring's thread. `Send` and `Sync`: any thread may ring.
///
/// It does not keep the ring alive: a ring that stayed open for its doorbells would keep its
/// armed polls, and the sockets they hold, open with it. Instead the [`Uring`] withdraws its
/// fd from every doorbell before it closes it, under a lock that each ring holds for its
/// system call, so a message can never reach another ring that reused the fd number. A
/// doorbell of a dropped ring fails with `NotConnected`.
///
/// ```
/// use fdmon_uring::{Doorbell, Uring};
/// use std::time::Duration;
/// let mut u = Uring::new(8)?;
/// match Doorbell::new(&u) {
///     Ok(bell) => {
///         let t = std::thread::spawn(move || {
///             std::thread::sleep(Duration::from_millis(20));
///             bell.ring().unwrap();
///         });
///         // The wait ends when the message arrives, long before its timeout, and reports
///         // no event.
///         let t0 = std::time::Instant::now();
///         assert_eq!(u.wait(Some(Duration::from_secs(30)), |_| unreachable!())?, 0);
///         assert!(t0.elapsed() < Duration::from_secs(20));
///         t.join().unwrap();
///     }
///     // A kernel before 6.13: wake the ring through an eventfd it polls instead.
///     Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::Unsupported),
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Doorbell {
    target: Target,
}

/// The fd of a ring while it is open, shared by the ring and its doorbells.
pub(crate) type Target = Arc<RwLock<Option<RawFd>>>;

/// Withdraws the ring's fd from its doorbells (the ring's drop, before the fd closes): waits
/// for any ring in progress, and makes later ones fail.
pub(crate) fn withdraw(target: &Target) {
    *target.write().unwrap_or_else(PoisonError::into_inner) = None;
}

impl Doorbell {
    /// A doorbell for `uring`.
    ///
    /// # Errors
    /// `Unsupported` where the kernel cannot send ring messages without a ring (before 6.13),
    /// or where the probe (a message to fd -1) is not refused as the kernel refuses it.
    pub fn new<S: io_uring::squeue::EntryMarker>(uring: &Uring<S>) -> io::Result<Doorbell> {
        // The probe: a message to no ring at all. A kernel that has the call refuses the fd
        // (EBADF); one that does not refuses the call (EINVAL). Nothing is posted anywhere.
        match send(-1) {
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => {}
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("this kernel cannot send io_uring messages without a ring ({e})"),
                ));
            }
            // Something answers for the kernel (a seccomp filter returning errno 0, an
            // emulation): whatever it is, its "success" proves nothing about ring messages.
            Ok(()) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a ring message to fd -1 was accepted (a seccomp filter or an emulation answers for the kernel): ring messages are not used",
                ));
            }
        }
        Ok(Doorbell {
            target: uring.doorbell_target(),
        })
    }

    /// Wakes the ring's waiter: one system call, no fd of the waiter's to read afterwards.
    ///
    /// # Errors
    /// `NotConnected` once the ring is dropped; the kernel's (`ENOMEM`, `EBADFD` for a
    /// disabled ring). The caller should then fall back to another wakeup (an eventfd the
    /// ring polls).
    pub fn ring(&self) -> io::Result<()> {
        // Held across the system call: the ring cannot close its fd meanwhile.
        let target = self.target.read().unwrap_or_else(PoisonError::into_inner);
        match *target {
            Some(fd) => send(fd),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the ring of this doorbell is gone",
            )),
        }
    }
}

/// Posts a doorbell completion into the ring `ring_fd` names.
fn send(ring_fd: RawFd) -> io::Result<()> {
    let sqe = opcode::MsgRingData::new(types::Fd(ring_fd), 0, DOORBELL, None).build();
    loop {
        // SAFETY: the kernel reads one SQE from `&sqe` (an `Entry` is a `repr(C)` wrapper of
        // `io_uring_sqe`) during the call; fd -1 is what this register opcode requires.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                -1,
                IORING_REGISTER_SEND_MSG_RING,
                std::ptr::from_ref(&sqe),
                1,
            )
        };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_ring_from_another_thread_ends_a_wait_and_reports_nothing() {
        let mut u = Uring::new(8).unwrap();
        let bell = match Doorbell::new(&u) {
            Ok(b) => std::sync::Arc::new(b),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                panic!("kernel too old for ring messages: {e}")
            }
            Err(e) => panic!("{e}"),
        };
        // `new` posted nothing.
        assert!(u.ring.completion().is_empty());
        let b2 = bell.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            b2.ring().unwrap();
        });
        let start = std::time::Instant::now();
        let n = u
            .wait(Some(Duration::from_secs(10)), |_| panic!("reported"))
            .unwrap();
        assert_eq!(n, 0);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the wait was not ended"
        );
        t.join().unwrap();
    }

    #[test]
    fn a_doorbell_outliving_its_ring_rings_nothing_else() {
        let u = Uring::new(8).unwrap();
        let bell = Doorbell::new(&u).unwrap();
        drop(u);
        // A new ring may get the old fd number; the doorbell must not reach it.
        let mut other = Uring::new(8).unwrap();
        let e = bell.ring().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotConnected);
        assert!(
            other.ring.completion().is_empty(),
            "another ring got the message"
        );
    }
}
