//! Meta contexts in the negotiation: `NBD_OPT_LIST_META_CONTEXT` and
//! `NBD_OPT_SET_META_CONTEXT`. The one context this server knows is `base:allocation`
//! (holes and zeros, from `SEEK_HOLE`/`SEEK_DATA`).

use crate::export::Export;
use crate::proto::{self, rep};
use crate::structured::{BASE_ALLOCATION, BASE_ALLOCATION_ID};

/// Queries beyond this many in one option are refused with `NBD_REP_ERR_TOO_BIG`.
const MAX_QUERIES: usize = 128;

/// A length-prefixed string taken off the front of `rest`.
fn string<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?) as usize;
    if n > proto::MAX_STRING {
        return None;
    }
    let s = rest.get(4..4 + n)?;
    *rest = &rest[4 + n..];
    Some(s)
}

/// The export name and the queries of a meta context option; the option reply error
/// (`NBD_REP_ERR_INVALID` when the lengths do not add up or a string is too long,
/// `NBD_REP_ERR_TOO_BIG` for too many queries) otherwise.
fn parse(data: &[u8]) -> Result<(&[u8], Vec<&[u8]>), u32> {
    let invalid = Err(rep::ERR_INVALID);
    let mut rest = data;
    let Some(name) = string(&mut rest) else {
        return invalid;
    };
    let Some(count) = rest.get(0..4) else {
        return invalid;
    };
    let count = u32::from_be_bytes(count.try_into().unwrap()) as usize;
    rest = &rest[4..];
    if count > MAX_QUERIES {
        return Err(rep::ERR_TOO_BIG);
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        match string(&mut rest) {
            Some(q) => queries.push(q),
            None => return invalid,
        }
    }
    if !rest.is_empty() {
        return invalid;
    }
    Ok((name, queries))
}

/// Answers a LIST (`set` false) or SET (`set` true) option into `out`. For a SET, returns
/// whether `base:allocation` is now selected (every SET replaces the selection, a failed one
/// too); for a LIST, false.
pub(crate) fn answer(
    out: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    export: &Export,
    structured: bool,
    set: bool,
) -> bool {
    let fail = |out: &mut Vec<u8>, kind: u32, msg: &str| {
        proto::option_reply(out, option, kind, msg.as_bytes());
        false
    };
    if set && !structured {
        return fail(
            out,
            rep::ERR_INVALID,
            "NBD_OPT_SET_META_CONTEXT needs structured replies first",
        );
    }
    let (name, queries) = match parse(data) {
        Ok(p) => p,
        Err(rep::ERR_TOO_BIG) => {
            let msg = format!("at most {MAX_QUERIES} meta context queries");
            return fail(out, rep::ERR_TOO_BIG, &msg);
        }
        Err(kind) => return fail(out, kind, "malformed meta context option data"),
    };
    if !export.answers_to(name) {
        let msg = format!("no export named {}", crate::log::client_str(name));
        return fail(out, rep::ERR_UNKNOWN, &msg);
    }
    // LIST with no queries lists everything; `base:` lists the base namespace. A SET
    // selects exact names only.
    let selected = if set {
        queries.contains(&BASE_ALLOCATION)
    } else {
        queries.is_empty()
            || queries
                .iter()
                .any(|q| *q == BASE_ALLOCATION || *q == b"base:")
    };
    if selected {
        // A LIST's ids mean nothing and should be zero.
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let mut item = id.to_be_bytes().to_vec();
        item.extend_from_slice(BASE_ALLOCATION);
        proto::option_reply(out, option, rep::META_CONTEXT, &item);
    }
    proto::option_reply(out, option, rep::ACK, &[]);
    set && selected
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::meta_context_data as data;

    #[test]
    fn parsing_checks_every_length() {
        let d = data("disk", &["base:allocation", "qemu:dirty-bitmap:x"]);
        let (name, q) = parse(&d).unwrap();
        assert_eq!((name, q.len()), (&b"disk"[..], 2));
        assert_eq!(q[1], b"qemu:dirty-bitmap:x");
        assert_eq!(parse(&d[..d.len() - 1]), Err(rep::ERR_INVALID), "short");
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse(&long), Err(rep::ERR_INVALID), "trailing byte");
        let mut many = data("", &[]);
        many[4..8].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(parse(&many), Err(rep::ERR_TOO_BIG));
        assert_eq!(parse(&[0, 0]), Err(rep::ERR_INVALID));
    }
}
