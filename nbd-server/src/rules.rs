//! Each command's rules, in one table that the reader's one admit-and-serve path reads
//! (`transmission.rs`): which flags it takes, what a range past the end gets, whether it
//! writes, caps its length or needs a meta context, what a zero length gets, whether a payload
//! follows it, how much of the memory budget it holds while in flight, and the handler that
//! does its work (`commands.rs`, `read.rs`). A new command is one entry here and one handler.

use std::future::Future;
use std::pin::Pin;

use crate::commands;
use crate::handshake::Negotiated;
use crate::proto::{self, Request, cflag, cmd, err};
use crate::session::Ticket;

/// A command's work, once admitted: its handler's future.
pub(crate) type Work = Pin<Box<dyn Future<Output = ()>>>;

/// What a zero length gets.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Zero {
    /// A success reply, without running (nothing to do).
    Nothing,
    /// `EINVAL` (nothing to describe).
    Invalid,
    /// Nothing special: the command has no length.
    Unused,
}

/// One command's rules.
pub(crate) struct Rule {
    pub(crate) kind: u16,
    /// Flags it takes in every session.
    flags: u16,
    /// Also takes `DF` when structured replies were negotiated (READ).
    df: bool,
    /// A payload of the request's length follows it (WRITE); with extended headers it may
    /// then say so (`PAYLOAD_LEN`).
    pub(crate) payload: bool,
    /// It changes the file: `EPERM` on a read-only export.
    writes: bool,
    /// The error of a range past the export's end; `None`: the range is not checked.
    past_end: Option<u32>,
    /// Its length may not exceed the protocol's payload maximum (`EINVAL` beyond).
    capped: bool,
    /// It needs the `base:allocation` meta context (`EINVAL` without).
    needs_meta: bool,
    zero: Zero,
    /// It holds its length of the memory budget while in flight (its data is buffered).
    holds_length: bool,
    /// Its work.
    serve: fn(Ticket, Request, Vec<u8>) -> Work,
}

/// Every command the server serves but DISC (which ends the connection).
pub(crate) const RULES: &[Rule] = &[
    Rule {
        kind: cmd::READ,
        flags: cflag::FUA,
        df: true,
        payload: false,
        writes: false,
        past_end: Some(err::EINVAL),
        capped: true,
        needs_meta: false,
        zero: Zero::Nothing,
        holds_length: true,
        serve: |t, req, _| Box::pin(commands::read(t, req)),
    },
    Rule {
        kind: cmd::WRITE,
        flags: cflag::FUA,
        df: false,
        payload: true,
        writes: true,
        past_end: Some(err::ENOSPC),
        capped: false,
        needs_meta: false,
        zero: Zero::Nothing,
        holds_length: true,
        serve: |t, req, payload| Box::pin(commands::write(t, req, payload)),
    },
    Rule {
        kind: cmd::FLUSH,
        flags: cflag::FUA,
        df: false,
        payload: false,
        writes: false,
        past_end: None,
        capped: false,
        needs_meta: false,
        zero: Zero::Unused,
        holds_length: false,
        serve: |t, _, _| Box::pin(commands::flush(t)),
    },
    Rule {
        kind: cmd::TRIM,
        flags: cflag::FUA,
        df: false,
        payload: false,
        writes: true,
        past_end: Some(err::EINVAL),
        capped: false,
        needs_meta: false,
        zero: Zero::Nothing,
        holds_length: false,
        serve: |t, req, _| Box::pin(commands::discard_or_zero(t, req)),
    },
    Rule {
        kind: cmd::WRITE_ZEROES,
        flags: cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        df: false,
        payload: false,
        writes: true,
        past_end: Some(err::ENOSPC),
        capped: false,
        needs_meta: false,
        zero: Zero::Nothing,
        holds_length: false,
        serve: |t, req, _| Box::pin(commands::discard_or_zero(t, req)),
    },
    // FUA is valid on every command (and means nothing here); the length is bounded like a
    // READ's.
    Rule {
        kind: cmd::CACHE,
        flags: cflag::FUA,
        df: false,
        payload: false,
        writes: false,
        past_end: Some(err::EINVAL),
        capped: true,
        needs_meta: false,
        zero: Zero::Nothing,
        holds_length: false,
        serve: |t, req, _| Box::pin(commands::cache(t, req)),
    },
    // Without a meta context selected there is nothing to report; a zero length has no
    // extent to describe.
    Rule {
        kind: cmd::BLOCK_STATUS,
        flags: cflag::FUA | cflag::REQ_ONE,
        df: false,
        payload: false,
        writes: false,
        past_end: Some(err::EINVAL),
        capped: false,
        needs_meta: true,
        zero: Zero::Invalid,
        holds_length: false,
        serve: |t, req, _| Box::pin(commands::block_status(t, req)),
    },
];

/// The rule of `kind`, if the server serves it (DISC aside).
pub(crate) fn of(kind: u16) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.kind == kind)
}

/// What the reader does with a request, by its rule.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Reply at once with this error (0: success without running), reading past its payload
    /// first if it has one.
    Reply(u32),
    /// Admit it, holding this many bytes of the memory budget, and serve it.
    Serve { holds: usize },
}

impl Rule {
    /// The verdict on `req` in a session that negotiated `n`, for an export of `size` bytes,
    /// `read_only` or not.
    pub(crate) fn judge(
        &self,
        req: &Request,
        n: &Negotiated,
        size: u64,
        read_only: bool,
    ) -> Verdict {
        let mut allowed = self.flags;
        if self.df && n.structured {
            // Don't-fragment means something only with structured replies.
            allowed |= cflag::DF;
        }
        if self.payload && n.extended {
            allowed |= cflag::PAYLOAD_LEN;
        }
        let in_bounds = req
            .offset
            .checked_add(req.length)
            .is_some_and(|e| e <= size);
        let mut error = if req.flags & !allowed != 0 {
            err::EINVAL
        } else if self.writes && read_only {
            err::EPERM
        } else if self.past_end.is_some() && !in_bounds {
            self.past_end.unwrap_or(err::EINVAL)
        } else {
            0
        };
        if (self.capped && req.length > u64::from(proto::MAX_PAYLOAD))
            || (self.needs_meta && !n.base_allocation)
            || (self.zero == Zero::Invalid && req.length == 0)
        {
            error = err::EINVAL;
        }
        if error != 0 || (self.zero == Zero::Nothing && req.length == 0) {
            return Verdict::Reply(error);
        }
        Verdict::Serve {
            holds: if self.holds_length {
                req.length as usize
            } else {
                0
            },
        }
    }

    /// Its handler's work for `req`, admitted with `ticket` (`payload`: the WRITE's data).
    pub(crate) fn work(&self, ticket: Ticket, req: Request, payload: Vec<u8>) -> Work {
        (self.serve)(ticket, req, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, length: u64) -> Request {
        Request {
            flags,
            kind,
            handle: 1,
            offset,
            length,
        }
    }

    fn negotiated(structured: bool, extended: bool, base_allocation: bool) -> Negotiated {
        Negotiated {
            structured,
            extended,
            base_allocation,
        }
    }

    #[test]
    fn each_command_refuses_what_its_rule_says() {
        let plain = negotiated(false, false, false);
        let judge = |kind, flags, off, len, n: &Negotiated, ro| {
            of(kind)
                .unwrap()
                .judge(&req(kind, flags, off, len), n, 1 << 20, ro)
        };
        // Flags outside the command's set.
        assert_eq!(
            judge(cmd::READ, cflag::NO_HOLE, 0, 4096, &plain, false),
            Verdict::Reply(err::EINVAL)
        );
        assert_eq!(
            judge(cmd::READ, cflag::DF, 0, 4096, &plain, false),
            Verdict::Reply(err::EINVAL)
        );
        let structured = negotiated(true, false, false);
        assert_eq!(
            judge(cmd::READ, cflag::DF, 0, 4096, &structured, false),
            Verdict::Serve { holds: 4096 }
        );
        // Past the end: each command's own error.
        assert_eq!(
            judge(cmd::READ, 0, 1 << 20, 1, &plain, false),
            Verdict::Reply(err::EINVAL)
        );
        assert_eq!(
            judge(cmd::WRITE, 0, 1 << 20, 1, &plain, false),
            Verdict::Reply(err::ENOSPC)
        );
        assert_eq!(
            judge(cmd::TRIM, 0, 1 << 20, 1, &plain, false),
            Verdict::Reply(err::EINVAL)
        );
        assert_eq!(
            judge(cmd::WRITE_ZEROES, 0, 1 << 20, 1, &plain, false),
            Verdict::Reply(err::ENOSPC)
        );
        // A read-only export refuses writes, before their range.
        assert_eq!(
            judge(cmd::WRITE, 0, 1 << 20, 1, &plain, true),
            Verdict::Reply(err::EPERM)
        );
        assert_eq!(
            judge(cmd::READ, 0, 0, 1, &plain, true),
            Verdict::Serve { holds: 1 }
        );
        // Lengths: capped for READ and CACHE; zero is nothing to do, or nothing to describe.
        let big = u64::from(proto::MAX_PAYLOAD) + 1;
        assert_eq!(
            judge(cmd::CACHE, 0, 0, big, &plain, false),
            Verdict::Reply(err::EINVAL)
        );
        assert_eq!(judge(cmd::WRITE, 0, 0, 0, &plain, false), Verdict::Reply(0));
        let meta = negotiated(false, false, true);
        assert_eq!(
            judge(cmd::BLOCK_STATUS, 0, 0, 0, &meta, false),
            Verdict::Reply(err::EINVAL)
        );
        assert_eq!(
            judge(cmd::BLOCK_STATUS, 0, 0, 4096, &plain, false),
            Verdict::Reply(err::EINVAL)
        );
        assert_eq!(
            judge(cmd::BLOCK_STATUS, cflag::REQ_ONE, 0, 4096, &meta, false),
            Verdict::Serve { holds: 0 }
        );
        // FLUSH: only its flags are checked.
        assert_eq!(
            judge(cmd::FLUSH, 0, 1 << 40, 7, &plain, false),
            Verdict::Serve { holds: 0 }
        );
        // PAYLOAD_LEN only on a WRITE with extended headers.
        let extended = negotiated(true, true, false);
        assert_eq!(
            judge(cmd::WRITE, cflag::PAYLOAD_LEN, 0, 8, &extended, false),
            Verdict::Serve { holds: 8 }
        );
        assert_eq!(
            judge(cmd::WRITE, cflag::PAYLOAD_LEN, 0, 8, &structured, false),
            Verdict::Reply(err::EINVAL)
        );
    }

    #[test]
    fn every_served_command_has_one_rule() {
        for kind in [
            cmd::READ,
            cmd::WRITE,
            cmd::FLUSH,
            cmd::TRIM,
            cmd::WRITE_ZEROES,
            cmd::CACHE,
            cmd::BLOCK_STATUS,
        ] {
            assert_eq!(RULES.iter().filter(|r| r.kind == kind).count(), 1, "{kind}");
        }
        assert!(of(cmd::DISC).is_none() && of(99).is_none());
    }
}
