//! The NBD wire format (fixed newstyle negotiation, simple replies): constants, the request
//! header, and the encoders for the server's messages. All integers are big-endian.
//! Structured replies are in [`crate::structured`].

use std::io;

/// "NBDMAGIC": the first eight bytes of the greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": ends the greeting and starts every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts every transmission request once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Starts every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export refuses writes.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported (only with structured replies).
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA take effect for every connection to the export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers.
pub mod opt {
    /// Choose an export the old way (no reply header; an unknown name closes the connection).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS (refused: not supported).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Negotiate structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List the meta contexts matching some queries.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select meta contexts for `NBD_CMD_BLOCK_STATUS`.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Negotiate extended headers: 32-byte requests and replies, 64-bit lengths.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// The option is done.
    pub const ACK: u32 = 1;
    /// One export of a `LIST`.
    pub const SERVER: u32 = 2;
    /// Describe an export.
    pub const INFO: u32 = 3;
    /// One meta context: its id and name.
    pub const META_CONTEXT: u32 = 4;
    /// The option is not supported.
    pub const ERR_UNSUP: u32 = 0x8000_0001;
    /// The server's policy forbids the option.
    pub const ERR_POLICY: u32 = 0x8000_0002;
    /// The option is malformed.
    pub const ERR_INVALID: u32 = 0x8000_0003;
    /// TLS is required first (`NBD_OPT_STARTTLS`).
    pub const ERR_TLS_REQD: u32 = 0x8000_0005;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = 0x8000_0006;
    /// The request is too large (too many meta context queries).
    pub const ERR_TOO_BIG: u32 = 0x8000_0009;
    /// Extended headers are in use (a `STRUCTURED_REPLY` after `EXTENDED_HEADERS`).
    pub const ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;
}

/// `NBD_INFO_*` items of `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The canonical name.
    pub const NAME: u16 = 1;
    /// A human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// Read bytes.
    pub const READ: u16 = 0;
    /// Write the payload that follows.
    pub const WRITE: u16 = 1;
    /// Disconnect after the requests in flight.
    pub const DISC: u16 = 2;
    /// Persist every write already acknowledged.
    pub const FLUSH: u16 = 3;
    /// Discard a range (a hint).
    pub const TRIM: u16 = 4;
    /// Read a range ahead into the server's cache (a hint).
    pub const CACHE: u16 = 5;
    /// Make a range read back as zeros.
    pub const WRITE_ZEROES: u16 = 6;
    /// Report the allocation of a range (needs a meta context).
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access: persist before replying.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES`: allocate, do not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `READ`: one data chunk, no holes (only with structured replies).
    pub const DF: u16 = 1 << 2;
    /// `BLOCK_STATUS`: describe one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Extended headers: the length is that of a payload that follows (WRITE).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
    /// `WRITE_ZEROES`: fail with `ENOTSUP` rather than be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Error values in a simple reply.
pub mod err {
    /// Not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid request.
    pub const EINVAL: u32 = 22;
    /// No space (also a write past the end).
    pub const ENOSPC: u32 = 28;
    /// A fast zero that would be slow (only for `NBD_CMD_FLAG_FAST_ZERO`).
    pub const ENOTSUP: u32 = 95;
}

/// The longest string (export name, description) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// The largest READ or WRITE payload served; advertised as the maximum block size. A WRITE
/// announcing more is treated as a denial of service (the connection is closed), as the
/// protocol allows above 2^25 bytes; a READ asking for more gets `EINVAL`.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The preferred block size advertised.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a request header with extended headers.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of a simple reply header.
pub const REPLY_LEN: usize = 16;

/// A transmission request header, compact (28 bytes, 32-bit length) or extended (32 bytes,
/// 64-bit length).
///
/// ```
/// use nbd_server::proto::{cmd, Request};
/// let r = Request { flags: 0, kind: cmd::READ, handle: 7, offset: 4096, length: 512 };
/// let wire = r.encode();
/// assert_eq!(&wire[..4], &[0x25, 0x60, 0x95, 0x13]);
/// assert_eq!(Request::parse(&wire)?, r);
/// let long = Request { length: 1 << 40, ..r };
/// assert_eq!(Request::parse_extended(&long.encode_extended())?, long);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub kind: u16,
    /// The client's opaque cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte count (of the payload for a WRITE).
    pub length: u64,
}

impl Request {
    /// Parses a 28-byte header.
    ///
    /// # Errors
    /// `InvalidData` when the magic is wrong: the stream cannot be resynchronised.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> io::Result<Request> {
        check_magic(b, REQUEST_MAGIC)?;
        Ok(Request {
            length: u32::from_be_bytes(b[24..28].try_into().unwrap()).into(),
            ..Request::fields(b)
        })
    }

    /// Parses a 32-byte extended header.
    ///
    /// # Errors
    /// `InvalidData` when the magic is wrong.
    pub fn parse_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> io::Result<Request> {
        check_magic(b, EXTENDED_REQUEST_MAGIC)?;
        Ok(Request {
            length: u64::from_be_bytes(b[24..32].try_into().unwrap()),
            ..Request::fields(b)
        })
    }

    /// The fields both layouts share (length 0).
    fn fields(b: &[u8]) -> Request {
        Request {
            flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
            handle: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            length: 0,
        }
    }

    fn encode_fields(&self, magic: u32, b: &mut [u8]) {
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
    }

    /// Encodes it compact (what a client sends; used by tests and the bench).
    ///
    /// # Panics
    /// When the length does not fit the compact header's 32 bits.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let len = u32::try_from(self.length).expect("a compact request's length fits 32 bits");
        let mut b = [0u8; REQUEST_LEN];
        self.encode_fields(REQUEST_MAGIC, &mut b);
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    /// Encodes it with the extended header.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        self.encode_fields(EXTENDED_REQUEST_MAGIC, &mut b);
        b[24..32].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// `InvalidData` unless `b` starts with `magic`: the stream cannot be resynchronised.
fn check_magic(b: &[u8], magic: u32) -> io::Result<()> {
    let got = u32::from_be_bytes(b[0..4].try_into().unwrap());
    if got != magic {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad request magic {got:#010x}"),
        ));
    }
    Ok(())
}

/// Writes a simple reply header into `out[..16]`.
pub fn simple_reply(out: &mut [u8], error: u32, handle: u64) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
}

/// Appends an option reply (header and `data`) to `out`.
pub fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The data of an `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT` option: the
/// export name and the queries (what a client sends; used by tests).
///
/// ```
/// let d = nbd_server::proto::meta_context_data("disk", &["base:allocation"]);
/// assert_eq!(d.len(), 4 + 4 + 4 + 4 + 15);
/// ```
pub fn meta_context_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// The NBD error value for a failed file operation.
pub fn errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => err::EPERM,
        Some(libc::ENOMEM) => err::ENOMEM,
        Some(libc::EINVAL) => err::EINVAL,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => err::ENOSPC,
        // ENOTSUP is reserved for a failed FAST_ZERO; anything else unsupported is invalid.
        Some(libc::EOPNOTSUPP) => err::EINVAL,
        None if e.kind() == io::ErrorKind::OutOfMemory => err::ENOMEM,
        _ => err::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(Request::parse(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad[0] ^= 1;
        let e = Request::parse(&bad).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // Extended: 64-bit length at the end; a compact header is not one.
        let long = Request {
            length: 5 << 32,
            ..r
        };
        let wire = long.encode_extended();
        assert_eq!(&wire[..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(&wire[24..32], &[0, 0, 0, 5, 0, 0, 0, 0]);
        assert_eq!(Request::parse_extended(&wire).unwrap(), long);
        let mut compact_as_ext = [0u8; EXTENDED_REQUEST_LEN];
        compact_as_ext[..REQUEST_LEN].copy_from_slice(&r.encode());
        assert!(Request::parse_extended(&compact_as_ext).is_err());
    }

    #[test]
    fn replies_are_big_endian() {
        let mut b = [0u8; REPLY_LEN];
        simple_reply(&mut b, err::EINVAL, 7);
        assert_eq!(
            b,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        let mut v = Vec::new();
        option_reply(&mut v, opt::LIST, rep::ACK, &[]);
        assert_eq!(v.len(), 20);
        assert_eq!(&v[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    }

    #[test]
    fn errno_mapping() {
        let e = |n| errno(&io::Error::from_raw_os_error(n));
        assert_eq!(e(libc::EROFS), err::EPERM);
        assert_eq!(e(libc::EDQUOT), err::ENOSPC);
        assert_eq!(e(libc::EOPNOTSUPP), err::EINVAL);
        assert_eq!(e(libc::EBADF), err::EIO);
        assert_eq!(errno(&io::Error::other("x")), err::EIO);
    }
}
