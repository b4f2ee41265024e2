//! Waiting: [`Uring::wait`] stages what is queued, enters the kernel only when it must, and
//! reaps every completion into events (the crate docs say how).

use std::io;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use crate::busy::Backoff;
use crate::registry::{Op, Target};
use crate::user_data::{self, Tag};
use crate::{Event, Uring, errno, push_or_backlog};

impl<S: io_uring::squeue::EntryMarker> Uring<S> {
    /// Flushes staged changes, submits, waits up to `timeout` (`None`: no bound) for at least
    /// one completion, and reports every completion in the ring through `on_event`. Returns
    /// the number of events reported.
    ///
    /// # Errors
    /// An error of `io_uring_enter` other than `EINTR`, `ETIME`, and a busy kernel that the
    /// reaping of completions cures.
    pub fn wait(
        &mut self,
        timeout: Option<Duration>,
        mut on_event: impl FnMut(Event),
    ) -> io::Result<usize> {
        let mut reported = self.stage(&mut on_event)?;
        let zero = timeout.is_some_and(|t| t.is_zero()) || reported > 0;
        if zero || !self.ring.completion().is_empty() {
            // Only a look at the completion ring, unless there is something to submit, an
            // overflow to flush, or deferred completion work for this thread to run.
            let must_enter = {
                let sq = self.ring.submission();
                !sq.is_empty() || sq.cq_overflow() || sq.taskrun()
            };
            if must_enter {
                self.enter_nowait(&mut on_event, &mut reported)?;
            }
        } else {
            self.enter_wait(timeout, &mut on_event, &mut reported)?;
        }
        reported += self.reap(&mut on_event);
        Ok(reported)
    }

    /// Moves the backlog and the staged registration changes into the submission queue.
    /// Returns the number of events reported while making room.
    fn stage(&mut self, on_event: &mut impl FnMut(Event)) -> io::Result<usize> {
        let mut reported = 0;
        while !self.backlog.is_empty() {
            let taken = {
                let mut sq = self.ring.submission();
                let room = sq.capacity() - sq.len();
                let n = room.min(self.backlog.len());
                // SAFETY: backlog SQEs carry the same guarantees as when they were pushed.
                unsafe { sq.push_multiple(&self.backlog[..n]) }.expect("room was checked");
                n
            };
            self.backlog.drain(..taken);
            if !self.backlog.is_empty() {
                self.enter_nowait(on_event, &mut reported)?;
            }
        }
        let Uring {
            ring,
            registry,
            backlog,
            faults,
            ..
        } = self;
        registry.flush(|op| {
            let entry = match op {
                Op::Arm {
                    file: Target::Fd(fd),
                    events,
                    user_data,
                } => opcode::PollAdd::new(types::Fd(fd), events)
                    .build()
                    .user_data(user_data),
                Op::Arm {
                    file: Target::Fixed(i),
                    events,
                    user_data,
                } => opcode::PollAdd::new(types::Fixed(i), events)
                    .build()
                    .user_data(user_data),
                Op::Disarm { target } => opcode::PollRemove::new(target)
                    .build()
                    .user_data(user_data::remove_of(target)),
            };
            // SAFETY: POLL_ADD and POLL_REMOVE refer to no caller memory.
            unsafe { push_or_backlog(ring, backlog, faults, entry.into()) }
        })?;
        Ok(reported)
    }

    /// Submits without waiting; on a busy kernel, reaps completions so that it can go on, or
    /// pauses when there are none (see `busy.rs`).
    fn enter_nowait(
        &mut self,
        on_event: &mut impl FnMut(Event),
        reported: &mut usize,
    ) -> io::Result<()> {
        let mut backoff = Backoff::default();
        loop {
            let res = match self.faults.take() {
                Some(e) => Err(e),
                None => self.enter.submit(&mut self.ring),
            };
            match res {
                Ok(_) => return Ok(()),
                Err(e) if errno(&e) == libc::EINTR => continue,
                Err(e) if matches!(errno(&e), libc::EBUSY | libc::EAGAIN) => {
                    let n = self.reap(on_event);
                    *reported += n;
                    if n == 0 {
                        self.busy_pauses += 1;
                        if !backoff.pause() {
                            return Err(e);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits and waits for one completion, up to `timeout`.
    fn enter_wait(
        &mut self,
        timeout: Option<Duration>,
        on_event: &mut impl FnMut(Event),
        reported: &mut usize,
    ) -> io::Result<()> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut backoff = Backoff::default();
        loop {
            if let Some(e) = self.faults.take() {
                if self.busy(e, deadline, &mut backoff, on_event, reported)? {
                    return Ok(());
                }
                continue;
            }
            let res = match (timeout, deadline) {
                (None, _) | (Some(_), None) => self.enter.submit_and_wait(&mut self.ring, None),
                (Some(_), Some(dl)) => {
                    let left = dl.saturating_duration_since(Instant::now());
                    self.enter.submit_and_wait(&mut self.ring, Some(left))
                }
            };
            match res {
                Ok(_) if self.ring.submission().is_empty() => return Ok(()),
                // A short submission: the kernel stopped at a failing SQE (whose error is in
                // the completion ring) and did not wait. Submit the rest; the wait ends at once
                // if completions are there.
                Ok(_) => continue,
                Err(e) => match errno(&e) {
                    libc::ETIME => return Ok(()),
                    libc::EINTR => {
                        if !self.ring.completion().is_empty()
                            || deadline.is_some_and(|dl| Instant::now() >= dl)
                        {
                            return Ok(());
                        }
                    }
                    _ => {
                        if self.busy(e, deadline, &mut backoff, on_event, reported)? {
                            return Ok(());
                        }
                    }
                },
            }
        }
    }

    /// After `io_uring_enter` failed with `e` in a wait: a busy kernel (`EAGAIN`/`EBUSY`) is
    /// cured by reaping (`Ok(true)`: the wait is over, it found events), else waited out with
    /// a pause (`Ok(false)`: try again), until the pauses are used up or the deadline passed
    /// (`Ok(true)`: the wait timed out). Any other error, and a kernel busy for too long, is
    /// returned.
    fn busy(
        &mut self,
        e: io::Error,
        deadline: Option<Instant>,
        backoff: &mut Backoff,
        on_event: &mut impl FnMut(Event),
        reported: &mut usize,
    ) -> io::Result<bool> {
        if !matches!(errno(&e), libc::EBUSY | libc::EAGAIN) {
            return Err(e);
        }
        let n = self.reap(on_event);
        *reported += n;
        if n > 0 {
            return Ok(true);
        }
        if deadline.is_some_and(|dl| Instant::now() >= dl) {
            return Ok(true);
        }
        self.busy_pauses += 1;
        if !backoff.pause() {
            return Err(e);
        }
        Ok(false)
    }

    /// Reports every completion in the ring. Returns how many events were reported.
    fn reap(&mut self, on_event: &mut impl FnMut(Event)) -> usize {
        let mut reported = 0;
        loop {
            let Uring { ring, registry, .. } = self;
            for cqe in ring.completion() {
                match user_data::decode(cqe.user_data()) {
                    Tag::User(token) => {
                        reported += 1;
                        on_event(Event::Complete {
                            token,
                            result: cqe.result(),
                            flags: cqe.flags(),
                        });
                    }
                    Tag::Poll { slot, generation } => {
                        if let Some((token, events)) =
                            registry.complete(slot, generation, cqe.result())
                        {
                            reported += 1;
                            on_event(Event::Ready { token, events });
                        }
                    }
                    Tag::Remove => {}
                }
            }
            // Completions the kernel kept aside while the ring was full come back with an
            // enter carrying GETEVENTS, which `submit` adds when the overflow flag is up.
            if !self.ring.submission().cq_overflow() {
                return reported;
            }
            if let Err(e) = self.ring.submit() {
                if !matches!(errno(&e), libc::EINTR | libc::EBUSY | libc::EAGAIN) {
                    return reported;
                }
            }
        }
    }
}
