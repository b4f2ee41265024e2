//! The lock-free core: what other threads touch. It owns the BH list and flags and the
//! `notify_me`/announcement wakeup protocol (`protocol.rs`, every synchronisation point numbered
//! and model-checked by `tests/loom.rs`), the atomics it may use (`sync.rs`, the one door loom
//! replaces), the protocol woken through an eventfd or a doorbell the fd layer provides (`notify.rs`), and [`EventNotifier`]. It
//! calls nothing else in the crate: every other layer may call it.

pub(crate) mod event_notifier;
pub(crate) mod notify;
pub(crate) mod protocol;
pub(crate) mod sync;
