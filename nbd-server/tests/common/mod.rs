//! A raw NBD client for the tests: each message spelled out, so the tests can also send what
//! a well-behaved client never would.

#![allow(dead_code, unused_imports)]

pub mod mounted;
pub mod pki;
pub mod served;
pub mod watched;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub use nbd_server::proto::{self, cflag, cmd, err, info, opt, rep, tflag};
pub use nbd_server::structured;

/// A client connection with a read timeout, so a server that hangs fails the test.
pub struct Client {
    pub s: TcpStream,
    /// Extended headers are in use: requests and replies have the 32-byte layouts.
    pub extended: bool,
}

/// What the server sent for an option.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl Client {
    pub fn connect(addr: std::net::SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect to the server");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Client { s, extended: false }
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to the server");
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("receive from the server");
        b
    }

    /// Whether the server closed the connection (end of stream or reset), reading and
    /// discarding anything before that.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("expected the server to close the connection: {e}"),
            }
        }
    }

    /// Reads the greeting, checks it, sends `client_flags`.
    pub fn handshake(&mut self, client_flags: u32) {
        let g = self.recv(18);
        assert_eq!(&g[0..8], &proto::NBDMAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &proto::IHAVEOPT.to_be_bytes());
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        self.send(&client_flags.to_be_bytes());
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let h = self.recv(20);
        assert_eq!(&h[0..8], &proto::OPTION_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let data = self.recv(len);
        OptReply { option, kind, data }
    }

    /// Sends INFO or GO for `name` asking for `infos`; returns the replies up to and
    /// including the final one.
    pub fn info_or_go(&mut self, option: u32, name: &str, infos: &[u16]) -> Vec<OptReply> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        self.option(option, &d);
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, option);
            let last = r.kind != rep::INFO;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Handshake plus GO for `name`: returns (size, transmission flags).
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        self.handshake(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        let replies = self.info_or_go(opt::GO, name, &[info::BLOCK_SIZE]);
        let last = replies.last().unwrap();
        assert_eq!(last.kind, rep::ACK, "GO refused: {replies:?}");
        let export = replies
            .iter()
            .find(|r| r.kind == rep::INFO && r.data[0..2] == info::EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(export.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
        (size, flags)
    }

    pub fn request(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, length: u32) {
        self.request64(flags, kind, handle, offset, length.into());
    }

    /// A request with a 64-bit length (extended headers only, beyond 32 bits).
    pub fn request64(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, length: u64) {
        let r = proto::Request {
            flags,
            kind,
            handle,
            offset,
            length,
        };
        if self.extended {
            self.send(&r.encode_extended());
        } else {
            self.send(&r.encode());
        }
    }

    /// Reads a reply without data: (error, handle). A simple reply, or with extended headers
    /// a single `NONE` or error chunk.
    pub fn reply(&mut self) -> (u32, u64) {
        if self.extended {
            let c = self.chunk();
            assert_eq!(c.flags, structured::FLAG_DONE, "{c:?}");
            let e = if c.kind == structured::kind::NONE {
                assert!(c.payload.is_empty());
                0
            } else {
                c.error()
            };
            return (e, c.handle);
        }
        let h = self.recv(16);
        assert_eq!(&h[0..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    pub fn write(&mut self, flags: u16, handle: u64, offset: u64, data: &[u8]) -> u32 {
        let flags = flags | if self.extended { cflag::PAYLOAD_LEN } else { 0 };
        self.request(flags, cmd::WRITE, handle, offset, data.len() as u32);
        self.send(data);
        let (e, h) = self.reply();
        assert_eq!(h, handle);
        e
    }

    /// READ; returns the error and, on success, the data.
    pub fn read(&mut self, handle: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.request(0, cmd::READ, handle, offset, len);
        let (e, h) = self.reply();
        assert_eq!(h, handle);
        let data = if e == 0 {
            self.recv(len as usize)
        } else {
            Vec::new()
        };
        (e, data)
    }

    /// A request without payload or data in the reply (FLUSH, TRIM, WRITE_ZEROES, ...).
    pub fn simple(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, len: u32) -> u32 {
        self.request(flags, kind, handle, offset, len);
        let (e, h) = self.reply();
        assert_eq!(h, handle);
        e
    }
}

/// One structured reply chunk.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    /// The request's offset, repeated in extended headers.
    pub request_offset: Option<u64>,
    pub payload: Vec<u8>,
}

impl Chunk {
    /// The error value of an error chunk.
    pub fn error(&self) -> u32 {
        assert_eq!(self.kind, structured::kind::ERROR, "{self:?}");
        u32::from_be_bytes(self.payload[0..4].try_into().unwrap())
    }

    /// The offset of a data or hole chunk.
    pub fn offset(&self) -> u64 {
        u64::from_be_bytes(self.payload[0..8].try_into().unwrap())
    }
}

impl Client {
    /// Handshake, structured replies, `base:allocation` if `meta`, then GO for `name`:
    /// returns (size, transmission flags).
    pub fn structured_go(&mut self, name: &str, meta: bool) -> (u64, u16) {
        self.handshake(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        self.option(opt::STRUCTURED_REPLY, &[]);
        let r = self.opt_reply();
        assert_eq!((r.option, r.kind), (opt::STRUCTURED_REPLY, rep::ACK));
        if meta {
            let got = self.meta_context(opt::SET_META_CONTEXT, name, &["base:allocation"]);
            assert_eq!(
                got,
                [(
                    structured::BASE_ALLOCATION_ID,
                    "base:allocation".to_string()
                )]
            );
        }
        let replies = self.info_or_go(opt::GO, name, &[]);
        assert_eq!(
            replies.last().unwrap().kind,
            rep::ACK,
            "GO refused: {replies:?}"
        );
        let export = &replies[0];
        let size = u64::from_be_bytes(export.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
        (size, flags)
    }

    /// Sends a LIST or SET meta context option; returns the contexts (id, name) replied
    /// before the ACK. Panics on an error reply.
    pub fn meta_context(
        &mut self,
        option: u32,
        name: &str,
        queries: &[&str],
    ) -> Vec<(u32, String)> {
        self.option(option, &meta_data(name, queries));
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, option);
            match r.kind {
                rep::META_CONTEXT => v.push((
                    u32::from_be_bytes(r.data[0..4].try_into().unwrap()),
                    String::from_utf8(r.data[4..].to_vec()).unwrap(),
                )),
                rep::ACK => return v,
                k => panic!(
                    "meta context option refused: {k:#x} {:?}",
                    String::from_utf8_lossy(&r.data)
                ),
            }
        }
    }

    /// Reads one structured chunk.
    pub fn chunk(&mut self) -> Chunk {
        let (magic, n) = if self.extended {
            (structured::EXTENDED_MAGIC, structured::EXTENDED_HEADER_LEN)
        } else {
            (structured::MAGIC, structured::HEADER_LEN)
        };
        let h = self.recv(n);
        assert_eq!(
            &h[0..4],
            &magic.to_be_bytes(),
            "not a chunk of the negotiated kind: {h:?}"
        );
        let (request_offset, len) = if self.extended {
            let len = u64::from_be_bytes(h[24..32].try_into().unwrap());
            (
                Some(u64::from_be_bytes(h[16..24].try_into().unwrap())),
                len as usize,
            )
        } else {
            (
                None,
                u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize,
            )
        };
        Chunk {
            flags: u16::from_be_bytes(h[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(h[6..8].try_into().unwrap()),
            handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            request_offset,
            payload: self.recv(len),
        }
    }

    /// Handshake, extended headers, `base:allocation` if `meta`, then GO for `name`:
    /// returns (size, transmission flags); requests and replies are extended from then on.
    pub fn extended_go(&mut self, name: &str, meta: bool) -> (u64, u16) {
        self.handshake(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        self.option(opt::EXTENDED_HEADERS, &[]);
        let r = self.opt_reply();
        assert_eq!((r.option, r.kind), (opt::EXTENDED_HEADERS, rep::ACK));
        if meta {
            let got = self.meta_context(opt::SET_META_CONTEXT, name, &["base:allocation"]);
            assert_eq!(got.len(), 1);
        }
        let replies = self.info_or_go(opt::GO, name, &[]);
        assert_eq!(
            replies.last().unwrap().kind,
            rep::ACK,
            "GO refused: {replies:?}"
        );
        self.extended = true;
        let export = &replies[0];
        let size = u64::from_be_bytes(export.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
        (size, flags)
    }

    /// Reads the chunks of one reply, up to and including the one marked done; every chunk
    /// must carry `handle`.
    pub fn chunks(&mut self, handle: u64) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            assert_eq!(c.handle, handle, "{c:?}");
            let done = c.flags & structured::FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }

    /// A structured READ: the error (0 for success) and the bytes the chunks describe, holes
    /// as zeros. Checks that the chunks cover the range exactly, without overlap.
    pub fn read_chunks(
        &mut self,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
    ) -> (u32, Vec<u8>, Vec<Chunk>) {
        self.request(flags, cmd::READ, handle, offset, len);
        let chunks = self.chunks(handle);
        if self.extended {
            assert!(
                chunks.iter().all(|c| c.request_offset == Some(offset)),
                "{chunks:?}"
            );
        }
        let mut data = vec![0u8; len as usize];
        let mut covered = vec![false; len as usize];
        for c in &chunks {
            let (at, n) = match c.kind {
                structured::kind::ERROR => return (c.error(), Vec::new(), chunks),
                structured::kind::OFFSET_DATA => {
                    let n = c.payload.len() - 8;
                    assert!(n > 0, "an empty data chunk");
                    let at = (c.offset() - offset) as usize;
                    data[at..at + n].copy_from_slice(&c.payload[8..]);
                    (at, n)
                }
                structured::kind::OFFSET_HOLE => {
                    let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize;
                    assert!(n > 0, "an empty hole chunk");
                    ((c.offset() - offset) as usize, n)
                }
                structured::kind::NONE => continue,
                k => panic!("unexpected chunk type {k}"),
            };
            for b in &mut covered[at..at + n] {
                assert!(!*b, "chunks overlap at {}", offset + at as u64);
                *b = true;
            }
        }
        assert!(
            covered.iter().all(|b| *b),
            "the chunks leave part of the range uncovered"
        );
        (0, data, chunks)
    }

    /// BLOCK_STATUS: the error, or the descriptors (length, status) of the one chunk
    /// (`BLOCK_STATUS`, or `BLOCK_STATUS_EXT` with extended headers).
    pub fn block_status(
        &mut self,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u32)>, u32> {
        self.request64(flags, cmd::BLOCK_STATUS, handle, offset, len);
        let chunks = self.chunks(handle);
        assert_eq!(chunks.len(), 1, "{chunks:?}");
        let c = &chunks[0];
        if c.kind == structured::kind::ERROR {
            return Err(c.error());
        }
        assert_eq!(
            &c.payload[0..4],
            &structured::BASE_ALLOCATION_ID.to_be_bytes()
        );
        let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
        let be32 = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
        if self.extended {
            assert_eq!(c.kind, structured::kind::BLOCK_STATUS_EXT);
            assert_eq!(c.request_offset, Some(offset));
            let n = be32(&c.payload[4..8]) as usize;
            let d: Vec<(u64, u32)> = c.payload[8..]
                .chunks_exact(16)
                .map(|d| {
                    let status = be64(&d[8..16]);
                    assert!(status >> 32 == 0, "base:allocation has 32-bit flags");
                    (be64(&d[0..8]), status as u32)
                })
                .collect();
            assert_eq!(d.len(), n, "the descriptor count");
            return Ok(check_descriptors(d, len));
        }
        assert_eq!(c.kind, structured::kind::BLOCK_STATUS);
        let d = c.payload[4..]
            .chunks_exact(8)
            .map(|d| (u64::from(be32(&d[0..4])), be32(&d[4..8])))
            .collect();
        Ok(check_descriptors(d, len))
    }
}

/// Pages of `path` in the page cache.
pub fn resident_pages(path: &std::path::Path) -> usize {
    let f = std::fs::File::open(path).unwrap();
    tests::resident_pages(&f, f.metadata().unwrap().len() as usize)
}

/// Drops the clean pages of `path` from the page cache.
pub fn drop_cache(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: posix_fadvise on an open fd; it touches no memory.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

/// Checks what the protocol asks of block status descriptors for a request of `len` bytes:
/// at least one, none empty, and all but the last short of the request's end.
fn check_descriptors(d: Vec<(u64, u32)>, len: u64) -> Vec<(u64, u32)> {
    assert!(!d.is_empty(), "at least one descriptor");
    assert!(d.iter().all(|e| e.0 > 0), "an empty descriptor: {d:?}");
    let before_last: u64 = d[..d.len() - 1].iter().map(|e| e.0).sum();
    assert!(before_last < len, "descriptors past the request: {d:?}");
    d
}

/// The data of a LIST or SET meta context option.
pub use nbd_server::proto::meta_context_data as meta_data;

/// A scratch file of `size` bytes filled with a known pattern, under the target directory.
pub fn scratch_file(tag: &str, size: usize) -> std::path::PathBuf {
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("nbd-{tag}-{}.img", std::process::id()));
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&path, data).unwrap();
    path
}

/// Makes the close of `s` send a reset (SO_LINGER with a zero timeout); returns a clone that
/// must be dropped too.
pub fn linger_zero(s: &TcpStream) -> TcpStream {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid linger struct for a live socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let _ = (&*s).flush();
    s.try_clone().unwrap()
}
