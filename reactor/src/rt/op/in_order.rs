//! What keeps a stream's bytes in order, and none lost, when its reads and writes are
//! cancelled.
//!
//! A read or write whose future is dropped may still be in the kernel's hands (an io_uring
//! `RECV` or `SEND` being cancelled), and the kernel may finish it before the cancellation
//! lands. So each direction of a stream is a [`Gate`]: one operation of it in flight at a time,
//! counted by an [`InFlight`] guard that the operation owns until the kernel is done with it
//! (whether or not its future is still there). A new read or write waits at the gate until the
//! one before it is over; what it did is then known:
//!
//! - **bytes an abandoned receive took from the socket** are [held](StreamState::hold) here and
//!   returned, in order, by the stream's next read, before anything newer;
//! - **bytes an abandoned send gave the kernel** count in [`StreamState::sent`], as every write's
//!   do, so a caller can learn what a write it dropped sent (`TcpStream::bytes_sent`, after
//!   `flush`).
//!
//! The gate costs a read or write two `Cell` updates when nothing waits at it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// One direction of a stream: how many of its operations are in flight, and who waits for
/// them to end.
#[derive(Default)]
pub(crate) struct Gate {
    in_flight: Cell<usize>,
    waiters: RefCell<Vec<Waker>>,
}

impl Gate {
    /// Ready once no operation of this direction is in flight; else registers the task to be
    /// woken when the last one ends.
    pub(crate) fn poll_clear(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.in_flight.get() == 0 {
            return Poll::Ready(());
        }
        let mut w = self.waiters.borrow_mut();
        if !w.iter().any(|o| o.will_wake(cx.waker())) {
            w.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Whether no operation of this direction is in flight.
    pub(crate) fn is_clear(&self) -> bool {
        self.in_flight.get() == 0
    }

    /// Waits until no operation of this direction is in flight.
    pub(crate) async fn clear(&self) {
        std::future::poll_fn(|cx| self.poll_clear(cx)).await;
    }

    fn enter(&self) {
        self.in_flight.set(self.in_flight.get() + 1);
    }

    fn leave(&self) {
        let n = self.in_flight.get() - 1;
        self.in_flight.set(n);
        if n == 0 {
            let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
            for w in waiters {
                w.wake();
            }
        }
    }
}

/// Which direction an [`InFlight`] guard counts in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Dir {
    Read,
    Write,
}

/// The state a stream shares with its operations in flight.
#[derive(Default)]
pub(crate) struct StreamState {
    reads: Gate,
    writes: Gate,
    /// Bytes abandoned receives took from the socket, not yet read.
    held: RefCell<VecDeque<u8>>,
    /// Bytes the kernel took from this stream's writes, in all.
    sent: Cell<u64>,
}

impl StreamState {
    pub(crate) fn new() -> Rc<StreamState> {
        Rc::new(StreamState::default())
    }

    pub(crate) fn gate(&self, dir: Dir) -> &Gate {
        match dir {
            Dir::Read => &self.reads,
            Dir::Write => &self.writes,
        }
    }

    /// A guard counting one operation of `dir` in flight until it is dropped.
    pub(crate) fn in_flight(self: &Rc<Self>, dir: Dir) -> InFlight {
        self.gate(dir).enter();
        InFlight {
            shared: self.clone(),
            dir,
        }
    }

    /// Keeps bytes an abandoned receive took, for the next read.
    pub(crate) fn hold(&self, bytes: &[u8]) {
        self.held.borrow_mut().extend(bytes);
    }

    /// Moves held bytes into `dst` (from its start); returns how many (0: none held).
    pub(crate) fn take_held(&self, dst: &mut [std::mem::MaybeUninit<u8>]) -> usize {
        let mut held = self.held.borrow_mut();
        let n = held.len().min(dst.len());
        let (a, b) = held.as_slices();
        let k = a.len().min(n);
        for (d, s) in dst.iter_mut().zip(a[..k].iter().chain(&b[..n - k])) {
            d.write(*s);
        }
        held.drain(..n);
        if held.is_empty() {
            // A burst of held bytes does not stay allocated with the stream.
            held.shrink_to(0);
        }
        n
    }

    /// Whether bytes are held for the next read.
    pub(crate) fn has_held(&self) -> bool {
        !self.held.borrow().is_empty()
    }

    /// Counts `n` bytes the kernel took from a write.
    pub(crate) fn count_sent(&self, n: usize) {
        self.sent.set(self.sent.get() + n as u64);
    }

    /// Bytes the kernel took from this stream's writes, in all.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.get()
    }
}

/// One operation of a stream in flight, from before it starts until the kernel is done with
/// it: owned by the operation, so a dropped future's operation still counts while the kernel
/// holds it.
pub(crate) struct InFlight {
    shared: Rc<StreamState>,
    dir: Dir,
}

impl InFlight {
    pub(crate) fn shared(&self) -> &StreamState {
        &self.shared
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.gate(self.dir).leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::MaybeUninit;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn a_gate_opens_when_the_last_operation_ends_and_wakes_each_waiter_once() {
        let s = StreamState::new();
        let count = Arc::new(Count(0.into()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(s.gate(Dir::Read).poll_clear(&mut cx).is_ready());
        let a = s.in_flight(Dir::Read);
        let b = s.in_flight(Dir::Read);
        assert!(s.gate(Dir::Read).poll_clear(&mut cx).is_pending());
        assert!(s.gate(Dir::Read).poll_clear(&mut cx).is_pending());
        assert!(s.gate(Dir::Write).poll_clear(&mut cx).is_ready());
        drop(a);
        assert_eq!(count.0.load(std::sync::atomic::Ordering::Relaxed), 0);
        drop(b);
        assert_eq!(count.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(s.gate(Dir::Read).poll_clear(&mut cx).is_ready());
    }

    #[test]
    fn held_bytes_come_back_in_order_across_reads_of_any_size() {
        let s = StreamState::new();
        s.hold(b"abc");
        s.hold(b"defgh");
        let mut dst = [MaybeUninit::new(0u8); 5];
        assert_eq!(s.take_held(&mut dst), 5);
        // SAFETY: all five were written.
        let got = dst.map(|b| unsafe { b.assume_init() });
        assert_eq!(got, *b"abcde");
        s.hold(b"ij");
        let mut dst = [MaybeUninit::new(0u8); 8];
        assert_eq!(s.take_held(&mut dst), 5);
        let got: Vec<u8> = dst[..5]
            .iter()
            // SAFETY: the first five were written.
            .map(|b| unsafe { b.assume_init() })
            .collect();
        assert_eq!(got, b"fghij");
        assert!(!s.has_held());
        assert_eq!(s.take_held(&mut dst), 0);
    }
}
