//! Caller-built io_uring operations on the reactor's own ring (QEMU's `aio_add_sqe`).
//!
//! An operation is a slot with a completion callback. Its completions, as the backend reports
//! them, go to a per-reactor queue that `poll` drains before BHs run; a nested `poll`
//! continues the same queue. A callback runs once per CQE and stays registered while the
//! kernel flags more CQEs to come (`IORING_CQE_F_MORE`, multishot operations).
//!
//! When the reactor is dropped, every operation still in flight is cancelled and waited for
//! before its callback (and whatever memory it owns) is dropped, so the kernel never writes
//! into freed memory.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;

use slab::Slab;

use crate::event_loop::Reactor;

/// The completion of an io_uring operation: the CQE's result and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Non-negative on success, `-errno` on failure.
    pub result: i32,
    /// The CQE's `IORING_CQE_F_*` flags.
    pub flags: u32,
}

impl Completion {
    /// The result as an `io::Result`.
    pub fn into_result(self) -> std::io::Result<u32> {
        if self.result < 0 {
            Err(std::io::Error::from_raw_os_error(-self.result))
        } else {
            Ok(self.result as u32)
        }
    }

    /// Whether more completions of the same (multishot) operation follow.
    pub fn more(&self) -> bool {
        self.flags & IORING_CQE_F_MORE != 0
    }
}

const IORING_CQE_F_MORE: u32 = 1 << 1;

/// Identifies one in-flight operation of one reactor.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpId {
    slot: u32,
    generation: u32,
}

impl fmt::Debug for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpId({}#{})", self.slot, self.generation)
    }
}

impl OpId {
    pub(crate) fn token(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.slot)
    }

    fn from_token(token: u64) -> OpId {
        OpId {
            slot: token as u32,
            generation: (token >> 32) as u32,
        }
    }
}

/// The token of internal operations (cancellations) whose completions carry nothing.
pub(crate) const IGNORED_TOKEN: u64 = (1 << 63) - 1;

/// A caller's completion closure ([`Reactor::submit_sqe`]).
type BoxedCallback = Box<dyn FnMut(&Reactor, Completion)>;

/// What runs for an operation's completions.
pub(crate) enum OpCallback {
    /// A caller's closure ([`Reactor::submit_sqe`]).
    Boxed(BoxedCallback),
    /// A runtime operation whose state, resources and completion handling share one
    /// allocation (`run_on_ring`, `rt/op/mod.rs`): no second allocation for a callback.
    Shared(std::rc::Rc<dyn OnComplete>),
}

impl OpCallback {
    fn call(&mut self, r: &Reactor, c: Completion) {
        match self {
            OpCallback::Boxed(f) => f(r, c),
            OpCallback::Shared(s) => s.on_complete(r, c),
        }
    }
}

/// The completion handling of a [`OpCallback::Shared`] operation.
pub(crate) trait OnComplete {
    /// Called once per completion of the operation, on the reactor's thread.
    fn on_complete(&self, r: &Reactor, c: Completion);
}

struct Slot {
    generation: u32,
    callback: Option<OpCallback>,
    /// Submitted with `Reactor::submit_sqe` (counted against `Builder::max_sqes_in_flight`).
    user: bool,
}

pub(crate) struct Ops {
    slots: RefCell<Slab<Slot>>,
    generation: Cell<u32>,
    queue: RefCell<VecDeque<(u64, Completion)>>,
    /// Operations of `Reactor::submit_sqe` in flight, and the most allowed
    /// (`Builder::max_sqes_in_flight`).
    users: Cell<usize>,
    max_users: usize,
    /// Runtime operations waiting for room in the ring's submission queue and backlog.
    room: RefCell<Vec<std::task::Waker>>,
}

impl Ops {
    pub(crate) fn new(max_users: usize) -> Self {
        Ops {
            slots: RefCell::new(Slab::new()),
            generation: Cell::new(0),
            queue: RefCell::new(VecDeque::new()),
            users: Cell::new(0),
            max_users,
            room: RefCell::new(Vec::new()),
        }
    }

    /// Reserves a slot for a new operation.
    pub(crate) fn insert(&self, callback: OpCallback) -> OpId {
        let generation = (self.generation.get() + 1) & 0x7fff_ffff;
        self.generation.set(generation);
        let user = matches!(callback, OpCallback::Boxed(_));
        self.users.set(self.users.get() + usize::from(user));
        let slot = self.slots.borrow_mut().insert(Slot {
            generation,
            callback: Some(callback),
            user,
        });
        OpId {
            slot: u32::try_from(slot).expect("more than 2^32 operations"),
            generation,
        }
    }

    /// Frees the slot of an operation that could not be submitted.
    pub(crate) fn forget(&self, id: OpId) {
        let slot = self.remove(id.slot);
        drop(slot);
    }

    /// Takes slot `i` out (its callback dropped by the caller, with no borrow held).
    fn remove(&self, i: u32) -> Option<Slot> {
        let slot = self.slots.borrow_mut().try_remove(i as usize);
        if slot.as_ref().is_some_and(|s| s.user) {
            self.users.set(self.users.get() - 1);
        }
        slot
    }

    /// Whether `id` is still in flight.
    pub(crate) fn contains(&self, id: OpId) -> bool {
        self.slots
            .borrow()
            .get(id.slot as usize)
            .is_some_and(|s| s.generation == id.generation)
    }

    /// Number of operations in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.slots.borrow().len()
    }

    /// Whether as many `submit_sqe` operations are in flight as the reactor allows.
    pub(crate) fn users_full(&self) -> bool {
        self.users.get() >= self.max_users
    }

    /// Registers a runtime operation that found no room, to be woken once some is made.
    pub(crate) fn wait_for_room(&self, w: &std::task::Waker) {
        let mut room = self.room.borrow_mut();
        if !room.iter().any(|o| o.will_wake(w)) {
            room.push(w.clone());
        }
    }

    /// Whether runtime operations wait for room in the ring's queue.
    pub(crate) fn awaits_room(&self) -> bool {
        !self.room.borrow().is_empty()
    }

    /// Wakes the operations waiting for room (after a wait submitted the ring's backlog);
    /// those that still find none wait again.
    pub(crate) fn wake_room(&self) {
        if self.room.borrow().is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut *self.room.borrow_mut());
        for w in waiters {
            w.wake();
        }
    }

    /// Queues a completion reported by the backend.
    pub(crate) fn complete(&self, token: u64, result: i32, flags: u32) {
        if token != IGNORED_TOKEN {
            self.queue
                .borrow_mut()
                .push_back((token, Completion { result, flags }));
        }
    }

    pub(crate) fn has_queued(&self) -> bool {
        !self.queue.borrow().is_empty()
    }

    /// Runs the callbacks of the queued completions, then wakes the operations waiting for
    /// room if there is some. Returns `true` if any callback ran.
    pub(crate) fn dispatch(&self, r: &Reactor) -> bool {
        let mut ran = false;
        loop {
            let Some((token, c)) = self.queue.borrow_mut().pop_front() else {
                self.wake_room();
                return ran;
            };
            let id = OpId::from_token(token);
            let cb = {
                let mut slots = self.slots.borrow_mut();
                match slots.get_mut(id.slot as usize) {
                    Some(s) if s.generation == id.generation => s.callback.take(),
                    _ => None,
                }
            };
            let Some(cb) = cb else { continue };
            ran = true;
            struct Done<'a> {
                ops: &'a Ops,
                id: OpId,
                cb: Option<OpCallback>,
                more: bool,
            }
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    let cb = self.cb.take();
                    let rest = if self.more {
                        let mut slots = self.ops.slots.borrow_mut();
                        match slots.get_mut(self.id.slot as usize) {
                            Some(s) if s.generation == self.id.generation => {
                                s.callback = cb;
                                None
                            }
                            _ => cb,
                        }
                    } else {
                        let slot = self.ops.remove(self.id.slot);
                        drop(slot);
                        cb
                    };
                    drop(rest); // user destructors run with no borrow held
                }
            }
            let mut done = Done {
                ops: self,
                id,
                cb: Some(cb),
                more: c.more(),
            };
            if let Some(cb) = done.cb.as_mut() {
                cb.call(r, c);
            }
        }
    }

    /// The ids of the operations in flight.
    pub(crate) fn ids(&self) -> Vec<OpId> {
        self.slots
            .borrow()
            .iter()
            .map(|(k, s)| OpId {
                slot: k as u32,
                generation: s.generation,
            })
            .collect()
    }

    /// Forgets every callback without dropping it: memory the kernel may still write to stays
    /// allocated for good (last resort at teardown).
    pub(crate) fn leak(&self) {
        for s in self.slots.borrow_mut().drain() {
            std::mem::forget(s);
        }
        self.users.set(0);
    }

    /// Drops every callback (after the caller made sure nothing is in flight any more).
    pub(crate) fn clear(&self) {
        let slots: Vec<Slot> = self.slots.borrow_mut().drain().collect();
        self.users.set(0);
        self.queue.borrow_mut().clear();
        drop(slots);
    }

    /// Drops the slots whose completions are queued and final (at teardown).
    pub(crate) fn retire_queued(&self) {
        loop {
            let Some((token, c)) = self.queue.borrow_mut().pop_front() else {
                return;
            };
            if c.more() {
                continue;
            }
            let id = OpId::from_token(token);
            let current = self
                .slots
                .borrow()
                .get(id.slot as usize)
                .is_some_and(|s| s.generation == id.generation);
            if current {
                drop(self.remove(id.slot));
            }
        }
    }
}
