//! The fd-handler registry: callbacks per fd, level-triggered dispatch, deferred deletion.
//!
//! Each registration is a slab slot with a generation; the backend token is
//! `generation << 32 | slot`, so an event for a slot that has been freed and reused is
//! recognised and dropped. Ready events are queued per slot (a slot is queued at most once,
//! with its event bits merged), so a nested `poll` first delivers what the outer one had
//! collected and never delivers the same readiness twice. Callbacks are taken out of the slot
//! while they run; a slot removed during dispatch is freed only when the outermost dispatch is
//! done, so callers further up the stack never find their slot reused.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::RawFd;

use slab::Slab;

use crate::event_loop::Reactor;
use crate::fd::interest::{self, Interest};

/// Identifies one fd registration of one reactor.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FdId {
    slot: u32,
    generation: u32,
}

impl fmt::Debug for FdId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FdId({}#{})", self.slot, self.generation)
    }
}

impl FdId {
    pub(crate) fn token(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.slot)
    }

    pub(crate) fn from_token(token: u64) -> FdId {
        FdId {
            slot: token as u32,
            generation: (token >> 32) as u32,
        }
    }
}

type IoCallback = Box<dyn FnMut(&Reactor, FdId)>;
type PollCallback = Box<dyn FnMut(&Reactor, FdId) -> bool>;
type PollModeCallback = Box<dyn FnMut(&Reactor, FdId, bool)>;

/// An event bit of our own (above the poll(2) bits): the handler's poll callback found work.
const POLLED: u32 = 1 << 31;

/// A handler that had no event for this long is not busy-polled any more.
pub(crate) const POLL_IDLE_NS: u64 = 1_000_000_000;

/// The callbacks of one fd registration, for [`Reactor::add_fd`].
///
/// The read callback runs while the fd is readable or has an error or hang-up; the write
/// callback while it is writable or has an error. Both are level-triggered: they run again in
/// every iteration as long as the condition holds, so a callback should consume what it was
/// woken for (or change the interest with [`Reactor::set_fd_interest`]).
///
/// A callback may also run once when there is nothing to do, and must then treat `EAGAIN` as
/// "nothing yet": on io_uring an event says the fd *became* ready since its poll was armed, so
/// if something else drained it in between, the callback finds it empty (epoll re-checks when
/// it reports, so there this happens only if the fd is drained by another thread).
///
/// ```
/// use reactor::FdHandler;
/// let h = FdHandler::new()
///     .on_read(|_reactor, _id| println!("readable"))
///     .on_write(|_reactor, _id| println!("writable"));
/// # drop(h);
/// ```
#[derive(Default)]
pub struct FdHandler {
    read: Option<IoCallback>,
    write: Option<IoCallback>,
    poll: Option<PollCallback>,
    poll_ready: Option<IoCallback>,
    poll_mode: Option<PollModeCallback>,
    interest: Option<Interest>,
}

impl FdHandler {
    /// No callbacks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the read callback (run on readable, error or hang-up).
    pub fn on_read(mut self, f: impl FnMut(&Reactor, FdId) + 'static) -> Self {
        self.read = Some(Box::new(f));
        self
    }

    /// Sets the write callback (run on writable or error).
    pub fn on_write(mut self, f: impl FnMut(&Reactor, FdId) + 'static) -> Self {
        self.write = Some(Box::new(f));
        self
    }

    /// Sets the busy-poll callback: a cheap check, without system calls, of whether the fd's
    /// work is ready (for example a look at a shared-memory ring). With adaptive polling on
    /// (see [`PollParams`](crate::PollParams)), the reactor calls it while it spins before a
    /// wait, for handlers that had an event in the last second; when it returns `true`, the
    /// [`on_poll_ready`](Self::on_poll_ready) callback (or else the read callback) runs in
    /// that iteration.
    pub fn on_poll(mut self, f: impl FnMut(&Reactor, FdId) -> bool + 'static) -> Self {
        self.poll = Some(Box::new(f));
        self
    }

    /// Sets the callback that does the work a successful [`on_poll`](Self::on_poll) check
    /// found. Without it, the read callback runs.
    pub fn on_poll_ready(mut self, f: impl FnMut(&Reactor, FdId) + 'static) -> Self {
        self.poll_ready = Some(Box::new(f));
        self
    }

    /// Sets the callback told when the reactor enters (`true`) and leaves (`false`) poll mode,
    /// so that a device can stop sending notifications while it is being polled. The reactor
    /// leaves poll mode only when it is really about to block.
    pub fn on_poll_mode(mut self, f: impl FnMut(&Reactor, FdId, bool) + 'static) -> Self {
        self.poll_mode = Some(Box::new(f));
        self
    }

    /// Starts the registration with `interest` instead of what the callbacks imply (for
    /// example [`Interest::NONE`], to switch it on later with
    /// [`Reactor::set_fd_interest`]).
    pub fn with_interest(mut self, interest: Interest) -> Self {
        self.interest = Some(interest);
        self
    }

    /// The interest to start with: the one asked for, or what the callbacks imply.
    pub(crate) fn initial_interest(&self) -> Interest {
        self.interest.unwrap_or_else(|| self.natural_interest())
    }

    /// The interest the present callbacks imply.
    pub(crate) fn natural_interest(&self) -> Interest {
        let mut i = Interest::NONE;
        if self.read.is_some() {
            i = i | Interest::READABLE;
        }
        if self.write.is_some() {
            i = i | Interest::WRITABLE;
        }
        i
    }
}

impl fmt::Debug for FdHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FdHandler")
            .field("read", &self.read.is_some())
            .field("write", &self.write.is_some())
            .field("poll", &self.poll.is_some())
            .field("poll_ready", &self.poll_ready.is_some())
            .finish()
    }
}

struct Slot {
    fd: RawFd,
    /// `(st_dev, st_ino)` of the file when it was registered.
    file: (u64, u64),
    /// The fd was closed and its number reused by a newer registration: this one no longer
    /// has a kernel registration and never runs again; it waits for `remove_fd`.
    stale: bool,
    generation: u32,
    interest: Interest,
    handler: FdHandler,
    has_read: bool,
    has_write: bool,
    /// Event bits collected but not yet dispatched.
    revents: u32,
    /// Reactor time of the last event (for "fired recently", when adaptive polling is on).
    last_event: u64,
    /// `on_poll_mode(true)` was called and `on_poll_mode(false)` not yet.
    in_poll_mode: bool,
    queued: bool,
    removed: bool,
}

pub(crate) struct Handlers {
    slots: RefCell<Slab<Slot>>,
    generation: Cell<u32>,
    ready: RefCell<VecDeque<u32>>,
    /// Live (not removed, not stale) registrations by fd number.
    by_fd: RefCell<HashMap<RawFd, u32>>,
    /// Slots with a poll callback.
    pollable: RefCell<Vec<u32>>,
    /// The reactor time that events are stamped with (set by the reactor when polling is on).
    now: Cell<u64>,
    /// Slots removed during dispatch, freed when the outermost dispatch ends.
    graveyard: RefCell<Vec<u32>>,
}

fn unknown(id: FdId) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{id:?} is not an fd registration of this reactor (removed already?)"),
    )
}

impl Handlers {
    pub(crate) fn new() -> Self {
        Handlers {
            slots: RefCell::new(Slab::new()),
            generation: Cell::new(0),
            ready: RefCell::new(VecDeque::new()),
            by_fd: RefCell::new(HashMap::new()),
            pollable: RefCell::new(Vec::new()),
            now: Cell::new(0),
            graveyard: RefCell::new(Vec::new()),
        }
    }

    /// Reserves a slot; the caller then registers the fd with the backend under the
    /// returned id, and calls [`forget`](Self::forget) if that fails.
    pub(crate) fn insert(
        &self,
        fd: RawFd,
        file: (u64, u64),
        handler: FdHandler,
        interest: Interest,
    ) -> FdId {
        let generation = (self.generation.get() + 1) & 0x7fff_ffff;
        self.generation.set(generation);
        let (has_read, has_write) = (handler.read.is_some(), handler.write.is_some());
        let slot = self.slots.borrow_mut().insert(Slot {
            fd,
            file,
            stale: false,
            generation,
            interest,
            handler,
            has_read,
            has_write,
            revents: 0,
            last_event: self.now.get(),
            in_poll_mode: false,
            queued: false,
            removed: false,
        });
        let slot = u32::try_from(slot).expect("more than 2^32 fd registrations");
        self.by_fd.borrow_mut().insert(fd, slot);
        if self.slots.borrow()[slot as usize].handler.poll.is_some() {
            self.pollable.borrow_mut().push(slot);
        }
        FdId { slot, generation }
    }

    /// The live registration of `fd`, with its file identity and interest.
    pub(crate) fn live_for_fd(&self, fd: RawFd) -> Option<(FdId, (u64, u64), Interest)> {
        let key = *self.by_fd.borrow().get(&fd)?;
        let slots = self.slots.borrow();
        let s = slots.get(key as usize)?;
        Some((
            FdId {
                slot: key,
                generation: s.generation,
            },
            s.file,
            s.interest,
        ))
    }

    /// Retires a registration whose fd was closed and whose number a new registration takes.
    pub(crate) fn mark_stale(&self, id: FdId) {
        let mut slots = self.slots.borrow_mut();
        if let Some(s) = slots
            .get_mut(id.slot as usize)
            .filter(|s| s.generation == id.generation)
        {
            s.stale = true;
            s.interest = Interest::NONE;
            let mut by_fd = self.by_fd.borrow_mut();
            if by_fd.get(&s.fd) == Some(&id.slot) {
                by_fd.remove(&s.fd);
            }
        }
    }

    /// Drops a slot whose backend registration failed.
    pub(crate) fn forget(&self, id: FdId) {
        self.unpollable(id.slot);
        let slot = self.slots.borrow_mut().remove(id.slot as usize);
        let mut by_fd = self.by_fd.borrow_mut();
        if by_fd.get(&slot.fd) == Some(&id.slot) {
            by_fd.remove(&slot.fd);
        }
        drop(by_fd);
        drop(slot);
    }

    /// `(fd, interest)` of a live registration, and whether `new` is allowed for it.
    pub(crate) fn lookup(&self, id: FdId, new: Option<Interest>) -> io::Result<(RawFd, Interest)> {
        let slots = self.slots.borrow();
        let s = slots
            .get(id.slot as usize)
            .filter(|s| s.generation == id.generation && !s.removed)
            .ok_or_else(|| unknown(id))?;
        if let Some(new) = new {
            if s.stale {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{id:?}: its fd was closed and the number registered anew; remove it"),
                ));
            }
            if (new.is_readable() && !s.has_read) || (new.is_writable() && !s.has_write) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{id:?}: interest {new:?} needs a callback it was not given"),
                ));
            }
        }
        Ok((s.fd, s.interest))
    }

    pub(crate) fn set_interest(&self, id: FdId, interest: Interest) {
        if let Some(s) = self.slots.borrow_mut().get_mut(id.slot as usize) {
            s.interest = interest;
        }
    }

    /// Marks a registration removed; frees it now, or when the outermost dispatch ends.
    pub(crate) fn remove(&self, id: FdId, dispatching: bool) {
        {
            let mut slots = self.slots.borrow_mut();
            let Some(s) = slots.get_mut(id.slot as usize) else {
                return;
            };
            s.removed = true;
            s.interest = Interest::NONE;
            let mut by_fd = self.by_fd.borrow_mut();
            if by_fd.get(&s.fd) == Some(&id.slot) {
                by_fd.remove(&s.fd);
            }
        }
        self.unpollable(id.slot);
        if dispatching {
            self.graveyard.borrow_mut().push(id.slot);
        } else {
            let slot = self.slots.borrow_mut().remove(id.slot as usize);
            drop(slot); // the callbacks' destructors run with no borrow held
        }
    }

    /// Frees the slots removed during dispatch (the outermost dispatch has ended).
    pub(crate) fn bury(&self) {
        loop {
            let Some(key) = self.graveyard.borrow_mut().pop() else {
                return;
            };
            let slot = self.slots.borrow_mut().try_remove(key as usize);
            drop(slot);
        }
    }

    /// Records an event reported by the backend.
    pub(crate) fn ready(&self, token: u64, events: u32) {
        let id = FdId::from_token(token);
        let mut slots = self.slots.borrow_mut();
        let Some(s) = slots.get_mut(id.slot as usize) else {
            return;
        };
        if s.generation != id.generation || s.removed || s.stale {
            return; // a late event for a registration that is gone
        }
        s.revents |= events;
        s.last_event = self.now.get();
        if !s.queued {
            s.queued = true;
            self.ready.borrow_mut().push_back(id.slot);
        }
    }

    /// Whether events wait for dispatch.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    /// Runs the callbacks of every queued event. Returns `true` if any callback ran.
    pub(crate) fn dispatch(&self, r: &Reactor) -> bool {
        let mut progress = false;
        loop {
            let Some(key) = self.ready.borrow_mut().pop_front() else {
                break;
            };
            let (id, revents, interest) = {
                let mut slots = self.slots.borrow_mut();
                let Some(s) = slots.get_mut(key as usize) else {
                    continue;
                };
                s.queued = false;
                if s.removed || s.stale {
                    continue;
                }
                let id = FdId {
                    slot: key,
                    generation: s.generation,
                };
                (id, std::mem::take(&mut s.revents), s.interest)
            };
            if revents & POLLED != 0 {
                // The poll callback found work: its poll_ready callback, or the read callback.
                let has_ready = self.slots.borrow()[key as usize]
                    .handler
                    .poll_ready
                    .is_some();
                progress |= if has_ready {
                    self.run(r, id, |h| &mut h.poll_ready)
                } else {
                    self.run(r, id, |h| &mut h.read)
                };
            }
            if interest.is_readable() && revents & interest::READ_EVENTS != 0 {
                progress |= self.run(r, id, |h| &mut h.read);
            }
            if interest.is_writable() && revents & interest::WRITE_EVENTS != 0 {
                // The read callback may have removed the registration or changed its interest.
                let still = self.lookup(id, None).is_ok_and(|(_, i)| i.is_writable());
                if still {
                    progress |= self.run(r, id, |h| &mut h.write);
                }
            }
        }
        progress
    }

    /// Calls one callback of `id` (the one `field` picks): takes it out, calls it, puts it back
    /// unless the registration was removed meanwhile (also when it panics). A callback already
    /// running further up the stack is skipped (`None`); being level-triggered, its fd is
    /// reported again later.
    fn with_callback<C, R>(
        &self,
        id: FdId,
        field: fn(&mut FdHandler) -> &mut Option<C>,
        call: impl FnOnce(&mut C) -> R,
    ) -> Option<R> {
        let cb = {
            let mut slots = self.slots.borrow_mut();
            let s = slots
                .get_mut(id.slot as usize)
                .filter(|s| s.generation == id.generation)?;
            field(&mut s.handler).take()?
        };
        struct PutBack<'a, C> {
            handlers: &'a Handlers,
            id: FdId,
            field: fn(&mut FdHandler) -> &mut Option<C>,
            cb: Option<C>,
        }
        impl<C> Drop for PutBack<'_, C> {
            fn drop(&mut self) {
                let cb = self.cb.take();
                let rest = {
                    let mut slots = self.handlers.slots.borrow_mut();
                    match slots.get_mut(self.id.slot as usize) {
                        Some(s) if s.generation == self.id.generation && !s.removed => {
                            *(self.field)(&mut s.handler) = cb;
                            None
                        }
                        _ => cb,
                    }
                };
                drop(rest); // removed meanwhile: drop the callback with no borrow held
            }
        }
        let mut guard = PutBack {
            handlers: self,
            id,
            field,
            cb: Some(cb),
        };
        guard.cb.as_mut().map(call)
    }

    /// Runs an I/O callback of `id`; `true` if it ran.
    fn run(
        &self,
        r: &Reactor,
        id: FdId,
        field: fn(&mut FdHandler) -> &mut Option<IoCallback>,
    ) -> bool {
        r.count_fd_dispatch();
        self.with_callback(id, field, |cb| cb(r, id)).is_some()
    }

    /// Busy polling: calls the poll callbacks of the handlers that had an event in the last
    /// [`POLL_IDLE_NS`], and queues a "polled" event for each that found work. Returns `true`
    /// if any did.
    pub(crate) fn poll_recent(&self, r: &Reactor) -> bool {
        let now = self.now.get();
        let mut found = false;
        let n = self.pollable.borrow().len();
        for i in 0..n {
            let Some(key) = self.pollable.borrow().get(i).copied() else {
                break;
            };
            let id = {
                let slots = self.slots.borrow();
                match slots.get(key as usize) {
                    Some(s)
                        if !s.removed
                            && !s.stale
                            && now.saturating_sub(s.last_event) < POLL_IDLE_NS =>
                    {
                        FdId {
                            slot: key,
                            generation: s.generation,
                        }
                    }
                    _ => continue,
                }
            };
            if self.with_callback(id, |h| &mut h.poll, |cb| cb(r, id)) == Some(true) {
                found = true;
                self.ready(id.token(), POLLED);
            }
        }
        found
    }

    /// Tells the recently active pollable handlers that poll mode starts (`true`) or ends.
    pub(crate) fn set_poll_mode(&self, r: &Reactor, on: bool) {
        let now = self.now.get();
        let keys: Vec<u32> = self.pollable.borrow().clone();
        for key in keys {
            let id = {
                let mut slots = self.slots.borrow_mut();
                let Some(s) = slots.get_mut(key as usize) else {
                    continue;
                };
                let recent = now.saturating_sub(s.last_event) < POLL_IDLE_NS;
                let change = if on {
                    recent && !s.in_poll_mode
                } else {
                    s.in_poll_mode
                };
                if !change || s.removed || s.stale || s.handler.poll_mode.is_none() {
                    continue;
                }
                s.in_poll_mode = on;
                FdId {
                    slot: key,
                    generation: s.generation,
                }
            };
            self.with_callback(id, |h| &mut h.poll_mode, |cb| cb(r, id, on));
        }
    }

    /// Stamps events from now on with reactor time `now`.
    pub(crate) fn set_now(&self, now: u64) {
        self.now.set(now);
    }

    /// Forgets `key` as a pollable slot.
    fn unpollable(&self, key: u32) {
        self.pollable.borrow_mut().retain(|&k| k != key);
    }

    /// Drops every registration and its callbacks (reactor drop; the backend goes with it).
    pub(crate) fn clear(&self) {
        let slots: Vec<Slot> = self.slots.borrow_mut().drain().collect();
        self.ready.borrow_mut().clear();
        self.graveyard.borrow_mut().clear();
        self.by_fd.borrow_mut().clear();
        self.pollable.borrow_mut().clear();
        drop(slots); // user destructors run with no borrow held
    }

    /// Number of live registrations.
    pub(crate) fn len(&self) -> usize {
        self.slots
            .borrow()
            .iter()
            .filter(|(_, s)| !s.removed)
            .count()
    }
}
