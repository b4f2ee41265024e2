//! The one door through which the notification protocol reaches atomics.
//!
//! Every atomic type, `fence` and `Arc` that the BH list, the BH flags and the notifier use comes
//! from here, so that a model-checking build (`--cfg loom`) can substitute loom's versions in
//! one place. Nothing else in the crate imports `std::sync::atomic` for the protocol.

pub(crate) use std::sync::Arc;
pub(crate) use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering, fence};
