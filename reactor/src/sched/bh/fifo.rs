//! The home thread's intrusive FIFOs of nodes (the run queue and the local queue), and the
//! walk that classifies what is pending for the timeout.
//!
//! This file knows links, not nodes. A node is linked through its `Link::next`, which only the owner of its PENDING bit writes
//! (SP1) and which the home thread reads before clearing PENDING (SP8). The links this file
//! handles come from three places only: [`Fifo::push`] (whose caller owns the PENDING bit),
//! a take or close of the shared list (which gives the home thread the links of every node on
//! it), and another FIFO. Each such link is alive (the queue's reference, see `node.rs`) and
//! linked by this thread alone until it is popped. The private helpers below (`next_of`,
//! `set_next_of`, `walk`) rely on that, and are only called with such links.

use std::cell::Cell;
use std::ptr;

use crate::lockfree::protocol::{DELETED, IDLE, Link, List, SCHEDULED, TIMER};

/// What the timeout computation needs to know of pending BHs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peek {
    Nothing,
    Idle,
    Due,
}

impl Peek {
    pub(super) fn max_with(self, other: Peek) -> Peek {
        match (self, other) {
            (Peek::Due, _) | (_, Peek::Due) => Peek::Due,
            (Peek::Idle, _) | (_, Peek::Idle) => Peek::Idle,
            _ => Peek::Nothing,
        }
    }
}

/// `p.next`, for a queued link (see the module docs).
fn next_of(p: *mut Link) -> *mut Link {
    // SAFETY: `p` is queued: alive, and its `next` stable while PENDING (module docs).
    unsafe { (*p).next() }
}

/// `p.next = next`, for a link this thread is queueing (see the module docs).
fn set_next_of(p: *mut Link, next: *mut Link) {
    // SAFETY: `p` is alive and linked by this thread alone (module docs).
    unsafe { (*p).set_next(next) }
}

/// Classifies a chain of queued nodes from `p` (see the module docs).
fn walk(mut p: *mut Link) -> Peek {
    let mut seen = Peek::Nothing;
    while !p.is_null() {
        // SAFETY: `p` is queued, so alive (module docs).
        let f = unsafe { &*p }.flags();
        if f & (SCHEDULED | DELETED) == SCHEDULED && f & TIMER == 0 {
            if f & IDLE == 0 {
                return Peek::Due;
            }
            seen = Peek::Idle;
        } else if f & TIMER != 0 && f & SCHEDULED != 0 {
            return Peek::Due; // a timer changed: re-sync before sleeping
        }
        p = next_of(p);
    }
    seen
}

/// What is pending on the shared list (only the home thread takes it, so its nodes stay
/// queued while they are walked).
pub(super) fn peek_list(list: &List) -> Peek {
    walk(list.peek())
}

/// A FIFO of nodes linked through `next`, PENDING still set. Home thread only (`!Send`).
pub(super) struct Fifo {
    head: Cell<*mut Link>,
    tail: Cell<*mut Link>,
}

impl Fifo {
    pub(super) fn new() -> Self {
        Fifo {
            head: Cell::new(ptr::null_mut()),
            tail: Cell::new(ptr::null_mut()),
        }
    }

    /// Appends the chain `first..=last` (queued links, `last.next` null).
    fn append(&self, first: *mut Link, last: *mut Link) {
        match self.tail.get() {
            t if t.is_null() => self.head.set(first),
            t => set_next_of(t, first),
        }
        self.tail.set(last);
    }

    /// Appends one node's link.
    ///
    /// # Safety
    /// The caller has just set the node's PENDING bit, and taken the queue's reference if its
    /// kind needs one (`BhNode::push_ref`).
    pub(super) unsafe fn push(&self, link: &Link) {
        let link = ptr::from_ref(link).cast_mut();
        set_next_of(link, ptr::null_mut());
        self.append(link, link);
    }

    /// Appends a chain from the shared list (newest first), oldest first (SP7's order).
    fn append_reversed(&self, newest: *mut Link) {
        let mut p = newest;
        let mut reversed: *mut Link = ptr::null_mut();
        while !p.is_null() {
            let next = next_of(p);
            set_next_of(p, reversed);
            reversed = p;
            p = next;
        }
        if !reversed.is_null() {
            self.append(reversed, newest);
        }
    }

    /// Takes the shared list (SP7) onto the end of this FIFO, oldest first.
    pub(super) fn append_taken(&self, list: &List) {
        self.append_reversed(list.take().0);
    }

    /// Closes the shared list (at reactor drop) and appends what was on it.
    pub(super) fn append_closed(&self, list: &List) {
        self.append_reversed(list.close());
    }

    /// Moves every link of `other` to the end of this FIFO, in order.
    pub(super) fn append_all(&self, other: &Fifo) {
        let first = other.head.replace(ptr::null_mut());
        let last = other.tail.replace(ptr::null_mut());
        if !first.is_null() {
            self.append(first, last);
        }
    }

    /// Unlinks the oldest link; its node's PENDING is still set, and what kept it alive while
    /// queued is the caller's now.
    pub(super) fn pop(&self) -> Option<*mut Link> {
        let p = self.head.get();
        if p.is_null() {
            return None;
        }
        let next = next_of(p);
        self.head.set(next);
        if next.is_null() {
            self.tail.set(ptr::null_mut());
        }
        Some(p)
    }

    /// What is pending on this FIFO.
    pub(super) fn peek(&self) -> Peek {
        walk(self.head.get())
    }
}
