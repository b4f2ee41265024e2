//! The fixed-newstyle negotiation: greeting, client flags, then options until the client
//! chooses the export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves. Structured replies
//! (or extended headers, which include them) and the `base:allocation` meta context are
//! negotiated here, and TLS (`NBD_OPT_STARTTLS`) starts here, after which everything
//! negotiated before it is forgotten.

use std::io;

use crate::conn::{Reader, Sock};
use crate::export::Export;
use crate::meta;
use crate::proto::{self, info, opt, rep};
use crate::tls::stream::TlsStream;
use crate::tls::{Tls, TlsMode};

/// Option data longer than this closes the connection: the longest valid option (`GO` with a
/// 4096-byte name and a few hundred info requests) is far shorter.
const MAX_OPTION_DATA: u32 = 64 * 1024;

/// What the client negotiated for the transmission phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// Structured replies (`NBD_OPT_STRUCTURED_REPLY`, or implied by extended headers).
    pub(crate) structured: bool,
    /// Extended headers (`NBD_OPT_EXTENDED_HEADERS`): 32-byte requests and replies.
    pub(crate) extended: bool,
    /// `base:allocation` selected by the last `NBD_OPT_SET_META_CONTEXT`.
    pub(crate) base_allocation: bool,
}

/// How the negotiation ended.
pub(crate) enum Outcome {
    /// Enter transmission on this socket (TLS if it was started).
    Transmission(Sock, Negotiated),
    /// The client aborted; close.
    Aborted,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Runs the negotiation on `sock`, with TLS as `tls` allows or requires.
///
/// # Errors
/// The socket's errors; `InvalidData` for a protocol violation after which the connection
/// must close (unknown client flags, a bad option magic, an oversized option, an unknown
/// export chosen with `NBD_OPT_EXPORT_NAME`, `NBD_OPT_EXPORT_NAME` before TLS when TLS is
/// required, bytes sent after `NBD_OPT_STARTTLS` before the handshake); the TLS handshake's
/// errors.
pub(crate) async fn negotiate(
    mut sock: Sock,
    rd: &mut Reader,
    export: &Export,
    tls: Option<&Tls>,
) -> io::Result<Outcome> {
    let (mut out, no_zeroes) = greet(&sock, rd).await?;
    let mut got = Negotiated::default();
    let mut secure = Secure {
        offered: tls.is_some_and(Tls::offered),
        required: tls.is_some_and(|t| t.mode() == TlsMode::Require),
        up: false,
    };
    loop {
        let (option, data) = read_option(&sock, rd).await?;
        match answer(&mut out, option, &data, export, &mut got, no_zeroes, secure)? {
            Next::Option => out = send(&sock, out).await?,
            Next::StartTls => {
                out = send(&sock, out).await?;
                // What the client sent after STARTTLS and before its handshake would be
                // taken as sent over TLS: an injection. The connection closes.
                if rd.buffered() != 0 {
                    return Err(invalid(
                        "data sent after NBD_OPT_STARTTLS, before the TLS handshake",
                    ));
                }
                let (Sock::Plain(plain), Some(tls)) = (sock, tls) else {
                    unreachable!("STARTTLS is accepted only on plaintext with TLS offered");
                };
                let t = TlsStream::accept(plain, tls).await?;
                tracing::debug!(peer = t.peer(), "nbd: TLS is up");
                sock = Sock::Tls(Box::new(t));
                secure.up = true;
                // Nothing negotiated in clear survives: a downgrade (nbdkit's CVE-2021-3716)
                // has nothing to act on.
                got = Negotiated::default();
            }
            Next::Transmission => {
                send(&sock, out).await?;
                return Ok(Outcome::Transmission(sock, got));
            }
            Next::Abort => {
                // The client may already be gone: that is a normal abort.
                let _ = send(&sock, out).await;
                sock.close().await;
                return Ok(Outcome::Aborted);
            }
        }
    }
}

/// Where TLS stands in a negotiation.
#[derive(Clone, Copy, Debug)]
struct Secure {
    /// `NBD_OPT_STARTTLS` is accepted.
    offered: bool,
    /// Nothing but `STARTTLS` and `ABORT` is answered before TLS is up.
    required: bool,
    /// TLS is up.
    up: bool,
}

/// Sends the server's greeting and reads the client's flags. Returns the (emptied) output
/// buffer and whether the client asked for no zeroes after `NBD_OPT_EXPORT_NAME`'s reply.
async fn greet(sock: &Sock, rd: &mut Reader) -> io::Result<(Vec<u8>, bool)> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    let out = send(sock, out).await?;
    let cflags = u32::from_be_bytes(rd.read_array::<4>(sock).await?);
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if cflags & !known != 0 {
        return Err(invalid(format!("unknown client flags {cflags:#x}")));
    }
    Ok((out, cflags & proto::FLAG_C_NO_ZEROES != 0))
}

/// Reads one option's header and data (at most `MAX_OPTION_DATA` bytes).
async fn read_option(sock: &Sock, rd: &mut Reader) -> io::Result<(u32, Vec<u8>)> {
    let hdr = rd.read_array::<16>(sock).await?;
    let magic = u64::from_be_bytes(hdr[0..8].try_into().unwrap());
    let option = u32::from_be_bytes(hdr[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(hdr[12..16].try_into().unwrap());
    if magic != proto::IHAVEOPT {
        return Err(invalid(format!("bad option magic {magic:#x}")));
    }
    if len > MAX_OPTION_DATA {
        return Err(invalid(format!("option {option} with {len} bytes of data")));
    }
    let data = rd.read_into(sock, Vec::new(), len as usize).await?;
    tracing::debug!(option, len, "nbd option");
    Ok((option, data))
}

/// What an option leads to, once its replies are in the output buffer.
enum Next {
    /// Send them, then read the next option.
    Option,
    /// Send them (the `STARTTLS` acknowledgement), then run the TLS handshake.
    StartTls,
    /// Send them; transmission starts.
    Transmission,
    /// Send them if the client still listens; the client aborted.
    Abort,
}

/// Answers one option into `out`, recording what it negotiated in `got`.
///
/// # Errors
/// `InvalidData` for `NBD_OPT_EXPORT_NAME` of an unknown export, or before TLS when TLS is
/// required (the connection must close: that option has no error reply).
fn answer(
    out: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    export: &Export,
    got: &mut Negotiated,
    no_zeroes: bool,
    secure: Secure,
) -> io::Result<Next> {
    if secure.required && !secure.up {
        match option {
            opt::STARTTLS | opt::ABORT => {}
            opt::EXPORT_NAME => {
                return Err(invalid("NBD_OPT_EXPORT_NAME before TLS, which is required"));
            }
            _ => {
                let msg = b"TLS is required: send NBD_OPT_STARTTLS first";
                proto::option_reply(out, option, rep::ERR_TLS_REQD, msg);
                return Ok(Next::Option);
            }
        }
    }
    match option {
        opt::EXPORT_NAME => {
            if !export.answers_to(data) {
                return Err(invalid(format!(
                    "NBD_OPT_EXPORT_NAME for unknown export {}",
                    crate::log::client_str(data)
                )));
            }
            out.extend_from_slice(&export.size().to_be_bytes());
            let flags = export.transmission_flags(got.structured);
            out.extend_from_slice(&flags.to_be_bytes());
            if !no_zeroes {
                out.extend_from_slice(&[0u8; 124]);
            }
            return Ok(Next::Transmission);
        }
        opt::ABORT => {
            proto::option_reply(out, option, rep::ACK, &[]);
            return Ok(Next::Abort);
        }
        opt::LIST if data.is_empty() => {
            let mut item = Vec::with_capacity(4 + export.name().len());
            item.extend_from_slice(&(export.name().len() as u32).to_be_bytes());
            item.extend_from_slice(export.name().as_bytes());
            item.extend_from_slice(export.description().as_bytes());
            proto::option_reply(out, option, rep::SERVER, &item);
            proto::option_reply(out, option, rep::ACK, &[]);
        }
        opt::LIST => {
            proto::option_reply(out, option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data");
        }
        opt::INFO | opt::GO => {
            let described = info_or_go(out, option, data, export, got.structured);
            if described && option == opt::GO {
                return Ok(Next::Transmission);
            }
        }
        opt::STRUCTURED_REPLY if got.extended => {
            let msg = b"extended headers are in use; they include structured replies";
            proto::option_reply(out, option, rep::ERR_EXT_HEADER_REQD, msg);
        }
        opt::STRUCTURED_REPLY | opt::EXTENDED_HEADERS => {
            let (kind, msg): (u32, &[u8]) = if !data.is_empty() {
                (rep::ERR_INVALID, b"the option takes no data")
            } else if got.extended {
                (rep::ERR_INVALID, b"extended headers are negotiated already")
            } else {
                got.structured = true;
                got.extended = option == opt::EXTENDED_HEADERS;
                (rep::ACK, b"")
            };
            proto::option_reply(out, option, kind, msg);
        }
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            let set = option == opt::SET_META_CONTEXT;
            let selected = meta::answer(out, option, data, export, got.structured, set);
            if set {
                got.base_allocation = selected;
            }
        }
        opt::STARTTLS => {
            let (kind, msg): (u32, &[u8]) = if !secure.offered {
                (rep::ERR_POLICY, b"TLS is off on this server (--tls off)")
            } else if secure.up {
                (rep::ERR_INVALID, b"TLS is up already")
            } else if !data.is_empty() {
                (rep::ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            } else {
                proto::option_reply(out, option, rep::ACK, &[]);
                return Ok(Next::StartTls);
            };
            proto::option_reply(out, option, kind, msg);
        }
        _ => {
            let msg = format!("option {option} is not supported");
            proto::option_reply(out, option, rep::ERR_UNSUP, msg.as_bytes());
        }
    }
    Ok(Next::Option)
}

/// Answers `NBD_OPT_INFO`/`NBD_OPT_GO` into `out`; true when the export was described (and
/// acknowledged).
fn info_or_go(
    out: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    export: &Export,
    structured: bool,
) -> bool {
    let Some((name, requests)) = parse_info_request(data) else {
        let msg = b"malformed NBD_OPT_INFO/NBD_OPT_GO data";
        proto::option_reply(out, option, rep::ERR_INVALID, msg);
        return false;
    };
    if !export.answers_to(name) {
        let msg = format!("no export named {}", crate::log::client_str(name));
        proto::option_reply(out, option, rep::ERR_UNKNOWN, msg.as_bytes());
        return false;
    }
    let mut item = Vec::with_capacity(16);
    item.extend_from_slice(&info::EXPORT.to_be_bytes());
    item.extend_from_slice(&export.size().to_be_bytes());
    item.extend_from_slice(&export.transmission_flags(structured).to_be_bytes());
    proto::option_reply(out, option, rep::INFO, &item);
    // Each kind answered once: a request list may repeat one 32,000 times.
    let mut answered = [false; 4];
    for req in requests.chunks_exact(2) {
        let req = u16::from_be_bytes([req[0], req[1]]);
        match answered.get_mut(usize::from(req)) {
            Some(done) if !*done => *done = true,
            _ => continue,
        }
        item.clear();
        item.extend_from_slice(&req.to_be_bytes());
        match req {
            info::NAME => item.extend_from_slice(export.name().as_bytes()),
            info::DESCRIPTION if !export.description().is_empty() => {
                item.extend_from_slice(export.description().as_bytes())
            }
            info::BLOCK_SIZE => {
                let min = export.min_block();
                item.extend_from_slice(&min.to_be_bytes());
                item.extend_from_slice(&proto::PREFERRED_BLOCK.max(min).to_be_bytes());
                item.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
            }
            // EXPORT was sent already; unknown requests are ignored, as the protocol says.
            _ => continue,
        }
        proto::option_reply(out, option, rep::INFO, &item);
    }
    proto::option_reply(out, option, rep::ACK, &[]);
    true
}

/// Splits `INFO`/`GO` data into the name and the info requests (pairs of bytes); `None`
/// when the lengths do not add up or the name is too long.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    if name_len > proto::MAX_STRING {
        return None;
    }
    let name = data.get(4..4 + name_len)?;
    let rest = &data[4 + name_len..];
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let requests = &rest[2..];
    (requests.len() == 2 * n).then_some((name, requests))
}

/// Writes `out` and gives it back emptied.
async fn send(sock: &Sock, out: Vec<u8>) -> io::Result<Vec<u8>> {
    let (res, mut out) = sock.write_all(out).await;
    res?;
    out.clear();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::parse_info_request;

    #[test]
    fn info_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&[0, 3, 0, 1]);
        assert_eq!(
            parse_info_request(&d),
            Some((&b"disk"[..], &[0u8, 3, 0, 1][..]))
        );
        assert_eq!(
            parse_info_request(&d[..d.len() - 1]),
            None,
            "short request list"
        );
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), None, "trailing byte");
        assert_eq!(parse_info_request(&d[..3]), None, "short length");
        let mut huge = 5000u32.to_be_bytes().to_vec();
        huge.extend(std::iter::repeat_n(b'a', 5000));
        huge.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(parse_info_request(&huge), None, "name over 4096 bytes");
    }
}
