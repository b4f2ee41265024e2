//! A client connection: the socket (TCP or Unix, with or without TLS) and a buffered reader over the reactor's
//! owned-buffer reads.

use std::io;

use reactor::io::Slice;
use reactor::net::{TcpStream, UnixStream};
use reactor::{IoBuf, IoBufMut};

use crate::tls::stream::TlsStream;

/// The most plaintext one TLS record carries, so one TLS read gives.
const TLS_RECORD: usize = 16 * 1024;

/// A client's socket, TCP or Unix, before any TLS.
pub(crate) enum Plain {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Plain {
    /// Reads into the room after `buf`'s bytes; returns the count (0 at end of stream).
    pub(crate) async fn read_more(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let begin = buf.len();
        let (res, s) = self.read_range(Slice::new(buf, begin)).await;
        (res, s.into_inner())
    }

    async fn read_range(&self, s: Slice<Vec<u8>>) -> (io::Result<usize>, Slice<Vec<u8>>) {
        match self {
            Plain::Tcp(t) => t.read(s).await,
            Plain::Unix(u) => u.read(s).await,
        }
    }

    async fn write(&self, s: Slice<Vec<u8>>) -> (io::Result<usize>, Slice<Vec<u8>>) {
        match self {
            Plain::Tcp(t) => t.write(s).await,
            Plain::Unix(u) => u.write(s).await,
        }
    }

    /// Writes all of `buf`.
    pub(crate) async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            Plain::Tcp(s) => s.write_all(buf).await,
            Plain::Unix(s) => s.write_all(buf).await,
        }
    }

    /// Shuts both directions down (the peer sees the end of the stream).
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Plain::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Plain::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// The socket of one client: plaintext, or TLS after `NBD_OPT_STARTTLS`.
pub(crate) enum Sock {
    Plain(Plain),
    Tls(Box<TlsStream>),
}

impl Sock {
    pub(crate) fn tcp(s: TcpStream) -> Sock {
        Sock::Plain(Plain::Tcp(s))
    }

    pub(crate) fn unix(s: UnixStream) -> Sock {
        Sock::Plain(Plain::Unix(s))
    }

    /// Reads into the room after `buf`'s bytes; returns the count (0 at end of stream).
    pub(crate) async fn read_more(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let begin = buf.len();
        let (res, s) = self.read_range(Slice::new(buf, begin)).await;
        (res, s.into_inner())
    }

    /// Reads into the room of `s`.
    pub(crate) async fn read_range(
        &self,
        s: Slice<Vec<u8>>,
    ) -> (io::Result<usize>, Slice<Vec<u8>>) {
        match self {
            Sock::Plain(p) => p.read_range(s).await,
            Sock::Tls(t) => {
                let (begin, room) = (s.begin(), s.bytes_total());
                let mut v = s.into_inner();
                // Decrypted into the room, zeroed first (safe code cannot hand OpenSSL the
                // Vec's spare capacity): as much as one read can give, one TLS record.
                v.resize(begin + room.min(TLS_RECORD), 0);
                let res = t.read(&mut v[begin..]).await;
                v.truncate(begin + *res.as_ref().unwrap_or(&0));
                (res, Slice::range(v, begin, begin + room))
            }
        }
    }

    /// Writes what it can of `s`; returns the count.
    pub(crate) async fn write(&self, s: Slice<Vec<u8>>) -> (io::Result<usize>, Slice<Vec<u8>>) {
        match self {
            Sock::Plain(p) => p.write(s).await,
            Sock::Tls(t) => {
                // One piece at a time, so that the caller sees progress (its idle watchdog
                // measures time without any, as with a plain socket's partial writes).
                let n = s.bytes_init().min(crate::tls::stream::WRITE_CHUNK);
                let (begin, v) = (s.begin(), s.get_ref());
                let res = t.write_all(&v[begin..begin + n]).await.map(|()| n);
                (res, s)
            }
        }
    }

    /// Writes all of `buf`.
    pub(crate) async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            Sock::Plain(p) => p.write_all(buf).await,
            Sock::Tls(t) => (t.write_all(&buf).await, buf),
        }
    }

    /// Shuts both directions down (the peer sees the end of the stream).
    pub(crate) fn shutdown(&self) {
        match self {
            Sock::Plain(p) => p.shutdown(),
            Sock::Tls(t) => t.shutdown(),
        }
    }

    /// Ends the connection cleanly: TLS's `close_notify`, where TLS is up.
    pub(crate) async fn close(&self) {
        if let Sock::Tls(t) = self {
            t.close().await;
        }
    }
}

/// What a clean end of stream looks like to callers: `UnexpectedEof`.
fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the client closed the connection",
    )
}

/// Buffered reading from a [`Sock`]: one `recv` brings in as many requests as the client has
/// sent, and small payloads come out of the same buffer.
pub(crate) struct Reader {
    buf: Vec<u8>,
    pos: usize,
}

/// Size of the receive buffer.
const READ_BUF: usize = 64 * 1024;

impl Reader {
    pub(crate) fn new() -> Reader {
        Reader {
            buf: Vec::with_capacity(READ_BUF),
            pos: 0,
        }
    }

    /// Bytes read from the socket and not yet taken.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Makes at least `n <= READ_BUF` bytes available.
    async fn fill(&mut self, sock: &Sock, n: usize) -> io::Result<()> {
        debug_assert!(n <= READ_BUF);
        if self.buffered() >= n {
            return Ok(());
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        while self.buf.len() < n {
            let (res, buf) = sock.read_more(std::mem::take(&mut self.buf)).await;
            self.buf = buf;
            if res? == 0 {
                return Err(eof());
            }
        }
        Ok(())
    }

    /// The next `N` bytes.
    pub(crate) async fn read_array<const N: usize>(&mut self, sock: &Sock) -> io::Result<[u8; N]> {
        self.fill(sock, N).await?;
        let a: [u8; N] = self.buf[self.pos..self.pos + N].try_into().unwrap();
        self.pos += N;
        Ok(a)
    }

    /// Appends the next `n` bytes to `dst`: what is buffered is copied, the rest is read
    /// straight into `dst`.
    pub(crate) async fn read_into(
        &mut self,
        sock: &Sock,
        mut dst: Vec<u8>,
        n: usize,
    ) -> io::Result<Vec<u8>> {
        let take = n.min(self.buffered());
        dst.extend_from_slice(&self.buf[self.pos..self.pos + take]);
        self.pos += take;
        let end = dst.len() + (n - take);
        dst.reserve_exact(n - take);
        while dst.len() < end {
            // Never read past this payload: what follows belongs to the next request.
            let begin = dst.len();
            let (res, got) = sock.read_range(Slice::range(dst, begin, end)).await;
            dst = got.into_inner();
            if res? == 0 {
                return Err(eof());
            }
        }
        Ok(dst)
    }

    /// Discards the next `n` bytes.
    pub(crate) async fn skip(&mut self, sock: &Sock, mut n: u64) -> io::Result<()> {
        loop {
            let take = n.min(self.buffered() as u64) as usize;
            self.pos += take;
            n -= take as u64;
            if n == 0 {
                return Ok(());
            }
            self.fill(sock, 1).await?;
        }
    }
}
