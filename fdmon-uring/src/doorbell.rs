//! [`Doorbell`]: wakes a ring's waiter from any thread by posting a completion into its ring
//! (a ring message sent with `IORING_REGISTER_SEND_MSG_RING`, Linux 6.13), where an eventfd
//! would take a write by the waker, a poll wakeup run as task work in the waiter, and a read
//! to clear it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use io_uring::{opcode, types};

use crate::Uring;
use crate::user_data::DOORBELL;

/// `io_uring_register` opcode: send a `MSG_RING` request described by an SQE, without a ring
/// of one's own (Linux 6.13).
const IORING_REGISTER_SEND_MSG_RING: libc::c_long = 31;

/// Posts a completion that [`Uring::wait`] consumes and does not report: it only ends a wait
/// (blocking or about to block) of the ring's thread. `Send` and `Sync`: any thread may ring.
///
/// It holds its own reference to the ring (a duplicate of the ring's fd), so a message can
/// never reach another ring that reused the fd number after the [`Uring`] was dropped; a
/// message to a ring nobody waits on any more stays in its queue until the last doorbell is
/// dropped and the ring with it.
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
    ring: OwnedFd,
}

impl Doorbell {
    /// A doorbell for `uring`.
    ///
    /// # Errors
    /// `Unsupported` where the kernel cannot send ring messages without a ring (before 6.13),
    /// and the error of `dup` (`EMFILE`).
    pub fn new(uring: &Uring) -> io::Result<Doorbell> {
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
            Ok(()) => unreachable!("a message to fd -1 was accepted"),
        }
        let ring = uring.as_fd().try_clone_to_owned()?;
        Ok(Doorbell { ring })
    }

    /// Wakes the ring's waiter: one system call, no fd of the waiter's to read afterwards.
    ///
    /// # Errors
    /// The kernel's: `ENOMEM`, or `EBADFD` for a disabled ring. The caller should then fall
    /// back to another wakeup (an eventfd the ring polls).
    pub fn ring(&self) -> io::Result<()> {
        send(self.ring.as_raw_fd())
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
        // The doorbell's own reference keeps the (now unwatched) ring: no error, no other ring.
        let mut other = Uring::new(8).unwrap();
        bell.ring().unwrap();
        assert!(
            other.ring.completion().is_empty(),
            "another ring got the message"
        );
    }
}
