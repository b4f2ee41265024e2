//! The readiness registrations and their state machine.
//!
//! io_uring has no persistent interest set: readiness is a one-shot `POLL_ADD` that completes
//! once. A registration is therefore *armed* (one POLL_ADD in flight) or not, and every change is
//! staged: callers mark the slot dirty, and [`Registry::flush`] turns the difference between what
//! is wanted and what is armed into SQEs right before the ring is entered.
//!
//! - Level-triggering: after each POLL_ADD completion the slot is dirty again, so the next flush
//!   re-arms it; a still-ready fd completes again at once, exactly like epoll reporting it again.
//! - Removal: the slot leaves the fd table at once (so the fd can be registered anew), but its
//!   memory lives until the armed POLL_ADD completes, with its event or with `-ECANCELED` from
//!   the POLL_REMOVE that the flush sends.
//! - Interest changes while armed: the armed POLL_ADD is *superseded*: a POLL_REMOVE for it and
//!   a new POLL_ADD with the new interest go into the same submission, so the change takes
//!   effect in the very wait that flushes it (as `EPOLL_CTL_MOD` would). The superseded
//!   POLL_ADD's completion, event or `-ECANCELED`, is counted and dropped.
//! - Generations: every POLL_ADD gets a fresh generation, carried in its `user_data`; only the
//!   latest one of a slot reports events, and a completion that matches no arm of its slot (a
//!   slot freed and reused) is recognised and dropped.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;

use slab::Slab;

use crate::user_data;
use crate::{POLLERR, POLLHUP};

/// What a POLL_ADD names: the fd number, or the registration's slot in the ring's fixed-file
/// table, which holds the file itself, so that a poll re-armed after the caller closed the fd
/// (and the number was reused) still watches the file that was registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Fd(RawFd),
    Fixed(u32),
}

/// One SQE the registry wants submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// `POLL_ADD(file, events)` tagged with `user_data`.
    Arm {
        file: Target,
        events: u32,
        user_data: u64,
    },
    /// `POLL_REMOVE` of the POLL_ADD tagged `target`.
    Disarm { target: u64 },
}

#[derive(Debug)]
struct Reg {
    file: Target,
    token: u64,
    /// The interest the caller wants; ignored once `detached`.
    want: u32,
    /// Generation of the latest POLL_ADD.
    generation: u32,
    /// The interest of the latest POLL_ADD, while it is in flight.
    armed: Option<u32>,
    /// Earlier POLL_ADDs, cancelled by a POLL_REMOVE, whose completions are still to come.
    superseded: u32,
    /// The caller removed the registration; the slot waits for its POLL_ADD to come back.
    detached: bool,
    /// The POLL_ADD failed (for example `EBADF`: the fd was closed while registered). It is not
    /// re-armed until the caller changes the registration.
    parked: bool,
    /// Already listed in `Registry::dirty`.
    dirty: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    regs: Slab<Reg>,
    by_fd: HashMap<RawFd, usize>,
    dirty: Vec<usize>,
    generation: u32,
}

fn os_err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Fails like `epoll_ctl(EPOLL_CTL_ADD)` would: `EBADF` for a closed fd, `EPERM` for a regular
/// file or directory (always "ready", so watching one is a bug), so both backends agree.
fn check_pollable(fd: RawFd) -> io::Result<()> {
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer for the duration of the call.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG | libc::S_IFDIR => Err(os_err(libc::EPERM)),
        _ => Ok(()),
    }
}

impl Registry {
    /// Checks that `fd` can be added: not registered yet, open, pollable.
    pub(crate) fn check_new(&self, fd: RawFd) -> io::Result<()> {
        if self.by_fd.contains_key(&fd) {
            return Err(os_err(libc::EEXIST));
        }
        if self.regs.len() >= u32::MAX as usize {
            return Err(os_err(libc::ENOSPC));
        }
        check_pollable(fd)
    }

    /// Registers `fd` (polled through `file`) with `token` and interest `want`, after
    /// [`check_new`](Self::check_new).
    pub(crate) fn add(&mut self, fd: RawFd, file: Target, token: u64, want: u32) {
        let slot = self.regs.insert(Reg {
            file,
            token,
            want,
            generation: 0,
            armed: None,
            superseded: 0,
            detached: false,
            parked: false,
            dirty: false,
        });
        self.by_fd.insert(fd, slot);
        self.mark(slot);
    }

    /// Changes the token and interest of the registration of `fd`.
    pub(crate) fn modify(&mut self, fd: RawFd, token: u64, want: u32) -> io::Result<()> {
        let slot = *self.by_fd.get(&fd).ok_or_else(|| os_err(libc::ENOENT))?;
        let reg = &mut self.regs[slot];
        reg.token = token;
        reg.want = want;
        reg.parked = false;
        self.mark(slot);
        Ok(())
    }

    /// Removes the registration of `fd`; its slot lives until its POLL_ADD (if any) is back.
    /// Returns what it polled, so that the caller can release a fixed-file slot.
    pub(crate) fn remove(&mut self, fd: RawFd) -> io::Result<Target> {
        let slot = self.by_fd.remove(&fd).ok_or_else(|| os_err(libc::ENOENT))?;
        self.regs[slot].detached = true;
        self.mark(slot);
        Ok(self.regs[slot].file)
    }

    fn mark(&mut self, slot: usize) {
        let reg = &mut self.regs[slot];
        if !reg.dirty {
            reg.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Whether changes are staged that the next flush turns into SQEs.
    pub(crate) fn has_staged(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Number of slots, the ones waiting for their POLL_ADD to come back included.
    pub(crate) fn slots(&self) -> usize {
        self.regs.len()
    }

    /// Number of live registrations (as the caller sees them).
    pub(crate) fn len(&self) -> usize {
        self.by_fd.len()
    }

    /// Turns every staged change into SQEs through `emit`. A slot whose SQE could not be
    /// emitted stays staged, and the error is returned.
    pub(crate) fn flush(&mut self, mut emit: impl FnMut(Op) -> io::Result<()>) -> io::Result<()> {
        while let Some(slot) = self.dirty.pop() {
            self.regs[slot].dirty = false;
            if let Err(e) = self.reconcile(slot, &mut emit) {
                self.mark(slot);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Brings one slot's armed POLL_ADD in line with what is wanted.
    fn reconcile(
        &mut self,
        slot: usize,
        emit: &mut impl FnMut(Op) -> io::Result<()>,
    ) -> io::Result<()> {
        let reg = &mut self.regs[slot];
        let want = if reg.detached || reg.parked {
            0
        } else {
            reg.want
        };
        if let Some(armed) = reg.armed {
            if armed == want {
                return Ok(());
            }
            emit(Op::Disarm {
                target: user_data::poll(slot as u32, reg.generation),
            })?;
            reg.armed = None;
            reg.superseded += 1;
        }
        if want != 0 {
            let generation = user_data::next_generation(self.generation);
            emit(Op::Arm {
                file: reg.file,
                events: want,
                user_data: user_data::poll(slot as u32, generation),
            })?;
            self.generation = generation;
            reg.generation = generation;
            reg.armed = Some(want);
        } else if reg.detached && reg.superseded == 0 {
            self.regs.remove(slot);
        }
        Ok(())
    }

    /// A POLL_ADD of `slot`/`generation` completed with `res`. Returns the `(token, events)` to
    /// report, if it is the slot's latest POLL_ADD, the registration is still wanted and the
    /// events concern it.
    pub(crate) fn complete(&mut self, slot: u32, generation: u32, res: i32) -> Option<(u64, u32)> {
        let slot = slot as usize;
        let reg = self.regs.get_mut(slot)?;
        let report = if reg.armed.is_some() && reg.generation == generation {
            reg.armed = None;
            if res >= 0 {
                let events = res as u32 & (reg.want | POLLERR | POLLHUP);
                (!reg.detached && events != 0).then_some((reg.token, events))
            } else {
                if res != -libc::ECANCELED {
                    reg.parked = true;
                }
                None
            }
        } else if reg.superseded > 0 {
            reg.superseded -= 1;
            None
        } else {
            return None; // matches no arm of this slot
        };
        self.mark(slot);
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{POLLIN, POLLOUT};
    use std::os::fd::AsRawFd;

    fn add(r: &mut Registry, fd: RawFd, token: u64, want: u32) -> io::Result<()> {
        r.check_new(fd)?;
        r.add(fd, Target::Fd(fd), token, want);
        Ok(())
    }

    fn ops(r: &mut Registry) -> Vec<Op> {
        let mut v = Vec::new();
        r.flush(|op| {
            v.push(op);
            Ok(())
        })
        .unwrap();
        v
    }

    fn tag(op: Op) -> (u32, u32) {
        let (Op::Arm { user_data, .. } | Op::Disarm { target: user_data }) = op;
        match user_data::decode(user_data) {
            user_data::Tag::Poll { slot, generation } => (slot, generation),
            t => panic!("{t:?}"),
        }
    }

    #[test]
    fn arm_complete_rearm_remove() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let mut r = Registry::default();
        add(&mut r, fd, 9, POLLIN).unwrap();
        let [arm] = ops(&mut r)[..] else { panic!() };
        let (slot, generation) = tag(arm);
        assert!(ops(&mut r).is_empty(), "armed once");
        assert_eq!(
            r.complete(slot, generation, POLLIN as i32),
            Some((9, POLLIN))
        );
        let [rearm] = ops(&mut r)[..] else {
            panic!("re-armed")
        };
        let (_, generation) = tag(rearm);
        r.remove(fd).unwrap();
        let [disarm] = ops(&mut r)[..] else { panic!() };
        assert_eq!(tag(disarm), (slot, generation));
        assert_eq!(r.slots(), 1, "kept until the POLL_ADD is back");
        assert_eq!(r.complete(slot, generation, -libc::ECANCELED), None);
        assert!(ops(&mut r).is_empty());
        assert_eq!(r.slots(), 0);
        assert_eq!(
            r.complete(slot, generation, POLLIN as i32),
            None,
            "late and stale"
        );
    }

    #[test]
    fn modify_supersedes_the_armed_poll_in_one_flush() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let mut r = Registry::default();
        add(&mut r, fd, 1, POLLIN).unwrap();
        let [arm] = ops(&mut r)[..] else { panic!() };
        let (slot, g1) = tag(arm);
        r.modify(fd, 2, POLLOUT).unwrap();
        let [
            Op::Disarm { .. },
            Op::Arm {
                events, user_data, ..
            },
        ] = ops(&mut r)[..]
        else {
            panic!()
        };
        assert_eq!(events, POLLOUT);
        let (_, g2) = tag(Op::Arm {
            file: Target::Fd(fd),
            events,
            user_data,
        });
        assert_ne!(g1, g2);
        // The superseded POLL_ADD fired before its cancel: dropped, not reported, not re-armed.
        assert_eq!(r.complete(slot, g1, POLLIN as i32), None);
        assert!(ops(&mut r).is_empty());
        assert_eq!(r.complete(slot, g2, POLLOUT as i32), Some((2, POLLOUT)));
        r.remove(fd).unwrap();
        assert!(ops(&mut r).is_empty(), "nothing armed: freed at once");
        assert_eq!(r.slots(), 0);
    }

    #[test]
    fn errors_match_epoll() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut r = Registry::default();
        add(&mut r, a.as_raw_fd(), 1, POLLIN).unwrap();
        assert_eq!(
            add(&mut r, a.as_raw_fd(), 1, POLLIN)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EEXIST)
        );
        assert_eq!(
            r.modify(-5, 1, POLLIN).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        assert_eq!(r.remove(-5).unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert_eq!(
            add(&mut r, -5, 1, POLLIN).unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(
            add(&mut r, f.as_raw_fd(), 1, POLLIN)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EPERM)
        );
    }

    #[test]
    fn a_failed_poll_is_parked_until_modified() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut r = Registry::default();
        add(&mut r, a.as_raw_fd(), 1, POLLIN).unwrap();
        let [Op::Arm { user_data, .. }] = ops(&mut r)[..] else {
            panic!()
        };
        let user_data::Tag::Poll { slot, generation } = user_data::decode(user_data) else {
            panic!()
        };
        assert_eq!(r.complete(slot, generation, -libc::EBADF), None);
        assert!(ops(&mut r).is_empty(), "not re-armed in a loop");
        r.modify(a.as_raw_fd(), 1, POLLIN).unwrap();
        assert_eq!(ops(&mut r).len(), 1);
        assert_eq!(r.len(), 1);
    }
}
