//! A raw NBD client for the tests: each message spelled out, so the tests can also send what
//! a well-behaved client never would.

#![allow(dead_code, unused_imports)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub use nbd_server::proto::{self, cflag, cmd, err, info, opt, rep, tflag};

/// A client connection with a read timeout, so a server that hangs fails the test.
pub struct Client {
    pub s: TcpStream,
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
        Client { s }
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
        let r = proto::Request {
            flags,
            kind,
            handle,
            offset,
            length,
        };
        self.send(&r.encode());
    }

    /// Reads a simple reply header: (error, handle).
    pub fn reply(&mut self) -> (u32, u64) {
        let h = self.recv(16);
        assert_eq!(&h[0..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    pub fn write(&mut self, flags: u16, handle: u64, offset: u64, data: &[u8]) -> u32 {
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

/// A scratch file of `size` bytes filled with a known pattern, under the target directory.
pub fn scratch_file(tag: &str, size: usize) -> std::path::PathBuf {
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("nbd-{tag}-{}.img", std::process::id()));
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&path, data).unwrap();
    path
}
