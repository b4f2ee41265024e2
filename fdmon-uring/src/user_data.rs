//! The `user_data` word of every SQE this crate submits.
//!
//! Bit 63 clear: a caller's own operation; the 63 low bits are the caller's token, returned
//! unchanged in [`Event::Complete`](crate::Event::Complete).
//!
//! Bit 63 set: an internal poll operation on registration slot `slot` (bits 0..32) of generation
//! `gen` (bits 32..62). Bit 62 marks the POLL_REMOVE's own completion, which carries nothing the
//! monitor needs (the cancelled POLL_ADD completes on its own with `-ECANCELED`).

pub(crate) const INTERNAL: u64 = 1 << 63;
const REMOVE: u64 = 1 << 62;
const GEN_MASK: u32 = (1 << 30) - 1;

/// The completions a [`Doorbell`](crate::Doorbell) posts: decoded as a POLL_REMOVE's, which
/// carry nothing (no registration slot reaches `u32::MAX`).
pub(crate) const DOORBELL: u64 = u64::MAX;

/// Highest token a caller may use for its own operations.
pub const MAX_USER_TOKEN: u64 = INTERNAL - 1;

/// What a completion's `user_data` says it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    User(u64),
    Poll { slot: u32, generation: u32 },
    Remove,
}

pub(crate) fn poll(slot: u32, generation: u32) -> u64 {
    INTERNAL | (u64::from(generation & GEN_MASK) << 32) | u64::from(slot)
}

pub(crate) fn remove_of(poll_user_data: u64) -> u64 {
    poll_user_data | REMOVE
}

pub(crate) fn next_generation(g: u32) -> u32 {
    g.wrapping_add(1) & GEN_MASK
}

pub(crate) fn decode(user_data: u64) -> Tag {
    if user_data & INTERNAL == 0 {
        Tag::User(user_data)
    } else if user_data & REMOVE != 0 {
        Tag::Remove
    } else {
        Tag::Poll {
            slot: user_data as u32,
            generation: (user_data >> 32) as u32 & GEN_MASK,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let ud = poll(12345, GEN_MASK);
        assert_eq!(
            decode(ud),
            Tag::Poll {
                slot: 12345,
                generation: GEN_MASK
            }
        );
        assert_eq!(decode(remove_of(ud)), Tag::Remove);
        assert_eq!(decode(MAX_USER_TOKEN), Tag::User(MAX_USER_TOKEN));
        assert_eq!(next_generation(GEN_MASK), 0);
        assert_eq!(decode(DOORBELL), Tag::Remove);
    }
}
