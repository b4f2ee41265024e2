//! Structured replies (`NBD_OPT_STRUCTURED_REPLY`) and extended headers
//! (`NBD_OPT_EXTENDED_HEADERS`): the chunk headers, the chunk types this server sends, and
//! their encoders. All integers are big-endian.
//!
//! - With structured replies, READ and BLOCK_STATUS are answered with chunks behind a 20-byte
//!   header: a READ with data chunks (and hole chunks where the file has holes),
//!   BLOCK_STATUS with one `base:allocation` chunk, and an error of either with one error
//!   chunk. Other commands keep their simple replies, which the protocol allows.
//! - With extended headers every reply is made of chunks behind a 32-byte header that also
//!   carries the request's offset and a 64-bit payload length; a reply without data is a
//!   `NONE` chunk, and block status uses 64-bit descriptors (`BLOCK_STATUS_EXT`).
//!
//! The last chunk of a reply carries [`FLAG_DONE`].

/// Starts every structured reply chunk (compact headers).
pub const MAGIC: u32 = 0x668e_33ef;
/// Starts every reply chunk with extended headers.
pub const EXTENDED_MAGIC: u32 = 0x6e8a_278c;
/// Size of a chunk header: magic, flags, type, handle, payload length.
pub const HEADER_LEN: usize = 20;
/// Size of an extended chunk header: magic, flags, type, handle, offset, payload length.
pub const EXTENDED_HEADER_LEN: usize = 32;
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
    /// A meta context id, then (length, status) descriptors of 32 bits each.
    pub const BLOCK_STATUS: u16 = 5;
    /// A meta context id, a count, then (length, status) descriptors of 64 bits each.
    pub const BLOCK_STATUS_EXT: u16 = 6;
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

/// What every chunk of one reply carries: the request's cookie and offset, and which header
/// layout the connection negotiated.
///
/// ```
/// use nbd_server::structured::{kind, ReplyTo, FLAG_DONE};
/// let to = ReplyTo { handle: 7, offset: 4096, extended: false };
/// let mut b = vec![0u8; to.header_len()];
/// to.header(&mut b, FLAG_DONE, kind::NONE, 0);
/// assert_eq!(&b[..4], &nbd_server::structured::MAGIC.to_be_bytes());
/// assert_eq!(&b[4..8], &[0, 1, 0, 0]);
/// let ext = ReplyTo { extended: true, ..to };
/// assert_eq!(ext.header_len(), 32);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    /// The request's cookie.
    pub handle: u64,
    /// The request's offset (extended headers repeat it in every chunk).
    pub offset: u64,
    /// Extended headers are in use.
    pub extended: bool,
}

impl ReplyTo {
    /// Size of a chunk header.
    pub fn header_len(&self) -> usize {
        if self.extended {
            EXTENDED_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Size of the header of a data chunk: the chunk header and the data's offset.
    pub fn data_header_len(&self) -> usize {
        self.header_len() + 8
    }

    /// Size of a hole chunk: the chunk header, the hole's offset and its length.
    pub fn hole_len(&self) -> usize {
        self.header_len() + 12
    }

    /// Size of an error chunk without a message: the chunk header, the error, the message
    /// length.
    pub fn error_len(&self) -> usize {
        self.header_len() + 6
    }

    /// Writes a chunk header with a payload of `len` bytes into `out[..header_len()]`.
    pub fn header(&self, out: &mut [u8], flags: u16, kind: u16, len: u64) {
        let magic = if self.extended { EXTENDED_MAGIC } else { MAGIC };
        out[0..4].copy_from_slice(&magic.to_be_bytes());
        out[4..6].copy_from_slice(&flags.to_be_bytes());
        out[6..8].copy_from_slice(&kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        if self.extended {
            out[16..24].copy_from_slice(&self.offset.to_be_bytes());
            out[24..32].copy_from_slice(&len.to_be_bytes());
        } else {
            // Payloads are at most 32 MiB of data or a bounded descriptor list.
            debug_assert!(len <= u64::from(u32::MAX), "a compact chunk of {len} bytes");
            out[16..20].copy_from_slice(&(len as u32).to_be_bytes());
        }
    }

    /// Writes the header of a data chunk of `len` bytes at file offset `at` into
    /// `out[..data_header_len()]`; the data follows it.
    pub fn data_header(&self, out: &mut [u8], flags: u16, at: u64, len: usize) {
        let h = self.header_len();
        self.header(out, flags, kind::OFFSET_DATA, 8 + len as u64);
        out[h..h + 8].copy_from_slice(&at.to_be_bytes());
    }

    /// Appends a hole chunk: `len` bytes at `at` read as zeros.
    pub fn hole(&self, out: &mut Vec<u8>, flags: u16, at: u64, len: u32) {
        let (start, h) = (out.len(), self.header_len());
        out.resize(start + self.hole_len(), 0);
        self.header(&mut out[start..], flags, kind::OFFSET_HOLE, 12);
        out[start + h..start + h + 8].copy_from_slice(&at.to_be_bytes());
        out[start + h + 8..start + h + 12].copy_from_slice(&len.to_be_bytes());
    }

    /// Writes a final error chunk (no message) into `out[..error_len()]`.
    pub fn error(&self, out: &mut [u8], error: u32) {
        let h = self.header_len();
        self.header(out, FLAG_DONE, kind::ERROR, 6);
        out[h..h + 4].copy_from_slice(&error.to_be_bytes());
        out[h + 4..h + 6].copy_from_slice(&0u16.to_be_bytes());
    }

    /// Appends the final block status chunk for `context` with `extents` (length, status):
    /// `BLOCK_STATUS` with 32-bit descriptors, or `BLOCK_STATUS_EXT` with 64-bit ones and
    /// their count. Compact lengths must fit 32 bits.
    pub fn block_status(&self, out: &mut Vec<u8>, context: u32, extents: &[(u64, u32)]) {
        let start = out.len();
        out.resize(start + self.header_len(), 0);
        let (kind, len) = if self.extended {
            (kind::BLOCK_STATUS_EXT, 8 + 16 * extents.len())
        } else {
            (kind::BLOCK_STATUS, 4 + 8 * extents.len())
        };
        self.header(&mut out[start..], FLAG_DONE, kind, len as u64);
        out.extend_from_slice(&context.to_be_bytes());
        if self.extended {
            out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        }
        for &(length, status) in extents {
            if self.extended {
                out.extend_from_slice(&length.to_be_bytes());
                out.extend_from_slice(&u64::from(status).to_be_bytes());
            } else {
                let length = u32::try_from(length).expect("a compact extent fits 32 bits");
                out.extend_from_slice(&length.to_be_bytes());
                out.extend_from_slice(&status.to_be_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_laid_out_as_the_protocol_says() {
        let to = ReplyTo {
            handle: 9,
            offset: 8192,
            extended: false,
        };
        let mut b = [0u8; 26];
        to.error(&mut b, 22);
        assert_eq!(
            b,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 6, 0, 0, 0,
                22, 0, 0
            ]
        );
        let mut v = Vec::new();
        to.hole(&mut v, 0, 4096, 512);
        assert_eq!(v.len(), to.hole_len());
        assert_eq!(&v[6..8], &kind::OFFSET_HOLE.to_be_bytes());
        assert_eq!(&v[16..20], &12u32.to_be_bytes());
        assert_eq!(&v[20..28], &4096u64.to_be_bytes());
        assert_eq!(&v[28..32], &512u32.to_be_bytes());
        let mut d = [0u8; 28];
        to.data_header(&mut d, FLAG_DONE, 8192, 4096);
        assert_eq!(&d[16..20], &(4096u32 + 8).to_be_bytes());
        assert_eq!(&d[20..28], &8192u64.to_be_bytes());
        let mut s = Vec::new();
        to.block_status(&mut s, BASE_ALLOCATION_ID, &[(4096, 0), (512, 3)]);
        assert_eq!(s.len(), HEADER_LEN + 4 + 16);
        assert_eq!(&s[16..20], &20u32.to_be_bytes());
        assert_eq!(&s[20..24], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&s[32..40], &[0, 0, 2, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn extended_chunks_carry_the_offset_and_64_bit_lengths() {
        let to = ReplyTo {
            handle: 9,
            offset: 1 << 33,
            extended: true,
        };
        let mut b = vec![0u8; to.error_len()];
        to.error(&mut b, 5);
        assert_eq!(&b[0..4], &EXTENDED_MAGIC.to_be_bytes());
        assert_eq!(
            &b[16..24],
            &(1u64 << 33).to_be_bytes(),
            "the request's offset"
        );
        assert_eq!(&b[24..32], &6u64.to_be_bytes());
        assert_eq!(&b[32..38], &[0, 0, 0, 5, 0, 0]);
        let mut s = Vec::new();
        to.block_status(&mut s, BASE_ALLOCATION_ID, &[(5 << 32, 3)]);
        assert_eq!(s.len(), 32 + 8 + 16);
        assert_eq!(&s[6..8], &kind::BLOCK_STATUS_EXT.to_be_bytes());
        assert_eq!(&s[24..32], &24u64.to_be_bytes());
        assert_eq!(&s[36..40], &1u32.to_be_bytes(), "the descriptor count");
        assert_eq!(&s[40..48], &(5u64 << 32).to_be_bytes());
        assert_eq!(&s[48..56], &3u64.to_be_bytes());
    }
}
