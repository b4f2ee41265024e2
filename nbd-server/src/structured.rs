//! Structured replies (`NBD_OPT_STRUCTURED_REPLY`): the chunk header, the chunk types this
//! server sends, and their encoders. All integers are big-endian.
//!
//! Once a client negotiates them, READ and BLOCK_STATUS are answered with chunks: a READ
//! with data chunks (and hole chunks where the file has holes), BLOCK_STATUS with one
//! `base:allocation` chunk, and an error of either with one error chunk. The last chunk of
//! a reply carries [`FLAG_DONE`]. Other commands keep their simple replies, which the
//! protocol allows.

/// Starts every structured reply chunk.
pub const MAGIC: u32 = 0x668e_33ef;
/// Size of a chunk header: magic, flags, type, handle, payload length.
pub const HEADER_LEN: usize = 20;
/// Size of the header of a data chunk: the chunk header and the data's offset.
pub const DATA_HEADER_LEN: usize = HEADER_LEN + 8;
/// Size of a hole chunk: the chunk header, the hole's offset and its length.
pub const HOLE_LEN: usize = HEADER_LEN + 12;
/// Size of an error chunk without a message: the chunk header, the error, the message length.
pub const ERROR_LEN: usize = HEADER_LEN + 6;
/// Chunk flag: the last chunk of the reply.
pub const FLAG_DONE: u16 = 1 << 0;

/// Chunk types.
pub mod kind {
    /// No payload; only as the final chunk.
    pub const NONE: u16 = 0;
    /// An offset, then data.
    pub const OFFSET_DATA: u16 = 1;
    /// An offset and a length that read as zeros.
    pub const OFFSET_HOLE: u16 = 2;
    /// A meta context id, then (length, status) descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error value and a message: the request failed.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// The id this server gives the `base:allocation` meta context.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// The name of the one meta context this server knows.
pub const BASE_ALLOCATION: &[u8] = b"base:allocation";

/// `base:allocation` status bits.
pub mod state {
    /// The range is not allocated (a hole).
    pub const HOLE: u32 = 1 << 0;
    /// The range reads as zeros.
    pub const ZERO: u32 = 1 << 1;
}

/// Writes a chunk header into `out[..HEADER_LEN]`.
///
/// ```
/// use nbd_server::structured::{self, kind, FLAG_DONE};
/// let mut b = [0u8; structured::HEADER_LEN];
/// structured::header(&mut b, FLAG_DONE, kind::NONE, 7, 0);
/// assert_eq!(&b[..4], &structured::MAGIC.to_be_bytes());
/// assert_eq!(&b[4..8], &[0, 1, 0, 0]);
/// ```
pub fn header(out: &mut [u8], flags: u16, kind: u16, handle: u64, len: u32) {
    out[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
}

/// Writes the header of a data chunk of `len` bytes at `offset` into
/// `out[..DATA_HEADER_LEN]`; the data follows it.
pub fn data_header(out: &mut [u8], flags: u16, handle: u64, offset: u64, len: usize) {
    header(out, flags, kind::OFFSET_DATA, handle, (8 + len) as u32);
    out[HEADER_LEN..DATA_HEADER_LEN].copy_from_slice(&offset.to_be_bytes());
}

/// Appends a hole chunk: `len` bytes at `offset` read as zeros.
pub fn hole(out: &mut Vec<u8>, flags: u16, handle: u64, offset: u64, len: u32) {
    let at = out.len();
    out.resize(at + HOLE_LEN, 0);
    header(&mut out[at..], flags, kind::OFFSET_HOLE, handle, 12);
    out[at + HEADER_LEN..at + HEADER_LEN + 8].copy_from_slice(&offset.to_be_bytes());
    out[at + HEADER_LEN + 8..at + HOLE_LEN].copy_from_slice(&len.to_be_bytes());
}

/// Writes a final error chunk (no message) into `out[..ERROR_LEN]`.
pub fn error(out: &mut [u8], handle: u64, error: u32) {
    header(out, FLAG_DONE, kind::ERROR, handle, 6);
    out[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&error.to_be_bytes());
    out[HEADER_LEN + 4..ERROR_LEN].copy_from_slice(&0u16.to_be_bytes());
}

/// Appends a final `BLOCK_STATUS` chunk for `context` with `extents` (length, status).
pub fn block_status(out: &mut Vec<u8>, handle: u64, context: u32, extents: &[(u32, u32)]) {
    let at = out.len();
    out.resize(at + HEADER_LEN, 0);
    let len = 4 + 8 * extents.len();
    header(
        &mut out[at..],
        FLAG_DONE,
        kind::BLOCK_STATUS,
        handle,
        len as u32,
    );
    out.extend_from_slice(&context.to_be_bytes());
    for &(length, status) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&status.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_laid_out_as_the_protocol_says() {
        let mut b = [0u8; ERROR_LEN];
        error(&mut b, 9, 22);
        assert_eq!(
            b,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 6, 0, 0, 0,
                22, 0, 0
            ]
        );
        let mut v = Vec::new();
        hole(&mut v, 0, 3, 4096, 512);
        assert_eq!(v.len(), HOLE_LEN);
        assert_eq!(&v[6..8], &kind::OFFSET_HOLE.to_be_bytes());
        assert_eq!(&v[16..20], &12u32.to_be_bytes());
        assert_eq!(&v[20..28], &4096u64.to_be_bytes());
        assert_eq!(&v[28..32], &512u32.to_be_bytes());
        let mut d = [0u8; DATA_HEADER_LEN];
        data_header(&mut d, FLAG_DONE, 3, 8192, 4096);
        assert_eq!(&d[16..20], &(4096u32 + 8).to_be_bytes());
        assert_eq!(&d[20..28], &8192u64.to_be_bytes());
        let mut s = Vec::new();
        block_status(&mut s, 5, BASE_ALLOCATION_ID, &[(4096, 0), (512, 3)]);
        assert_eq!(s.len(), HEADER_LEN + 4 + 16);
        assert_eq!(&s[16..20], &20u32.to_be_bytes());
        assert_eq!(&s[20..24], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&s[32..40], &[0, 0, 2, 0, 0, 0, 0, 3]);
    }
}
