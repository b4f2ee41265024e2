//! A TLS connection over the reactor's sockets: OpenSSL encrypts and decrypts in memory, and
//! the ciphertext goes through the loop like any other socket I/O (on both backends), so a
//! handshake or a slow client never blocks the IoThread.
//!
//! One reader task and one writer task share the stream (see `session.rs`). OpenSSL's state
//! is borrowed only between awaits, never across one. Ciphertext leaves through one flusher at
//! a time, in the order it was made: whoever finds output waiting and no flush under way sends
//! it, and the others wait for that flush to end (a record must never interleave with
//! another's partial write). Once the connection is up only writes flush: what a read makes
//! OpenSSL write waits for the next write.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::{self, Read, Write};
use std::sync::OnceLock;
use std::task::{Poll, Waker};

use openssl::ex_data::Index;
use openssl::ssl::{ErrorCode, Ssl, SslRef, SslStream};
use openssl::x509::X509NameRef;

use super::{Tls, ssl_err};
use crate::conn::Plain;

/// Plaintext encrypted at once before its ciphertext is sent (16 TLS records).
pub(crate) const WRITE_CHUNK: usize = 256 * 1024;
/// Ciphertext read from the socket at once: a TLS record is at most 16 KiB plus its overhead.
const READ_CHUNK: usize = 32 * 1024;

/// What OpenSSL reads and writes: ciphertext buffers that the stream fills from, and empties
/// into, the socket.
#[derive(Default)]
struct Bio {
    input: Vec<u8>,
    pos: usize,
    output: Vec<u8>,
}

impl Read for Bio {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = &self.input[self.pos..];
        if avail.is_empty() {
            // OpenSSL reports this as WANT_READ: the stream reads more from the socket.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Bio {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why the server itself refused a handshake (an unknown PSK identity, one not on the
/// allow-list), kept on the connection's `Ssl` for the log line.
fn refusal_index() -> Index<Ssl, String> {
    static INDEX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("an OpenSSL ex_data index"))
}

/// The PSK identity a client offered, kept for the log line of a handshake that fails
/// after it (most likely with a wrong key).
fn offered_index() -> Index<Ssl, String> {
    static INDEX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("an OpenSSL ex_data index"))
}

/// Records why the server refused the handshake in progress on `ssl`.
pub(super) fn set_refusal(ssl: &mut SslRef, why: String) {
    ssl.set_ex_data(refusal_index(), why);
}

/// Records the PSK identity the client offered in the handshake in progress on `ssl`.
pub(super) fn set_offered(ssl: &mut SslRef, identity: &[u8]) {
    ssl.set_ex_data(offered_index(), crate::log::client_str(identity));
}

/// The error payload of a failed TLS handshake (see [`is_handshake_failure`]).
#[derive(Debug)]
struct HandshakeFailed(String);

impl std::fmt::Display for HandshakeFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TLS handshake: {}", self.0)
    }
}

impl std::error::Error for HandshakeFailed {}

/// Whether `e` is a failed TLS handshake (logged apart, rate-limited: a client can fail
/// handshakes in a loop).
pub(crate) fn is_handshake_failure(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<HandshakeFailed>())
}

/// An established TLS connection.
pub(crate) struct TlsStream {
    sock: Plain,
    ssl: RefCell<SslStream<Bio>>,
    /// A flush is under way (its future holds the output being sent).
    flushing: Cell<bool>,
    /// Tasks waiting for that flush to end.
    waiting: RefCell<Vec<Waker>>,
    /// The output buffer not in use, kept so that a write does not allocate.
    spare: Cell<Vec<u8>>,
    /// Who the client authenticated as: a PSK username, a certificate DN, or "".
    peer: String,
}

/// Ends a flush however its future ends: the next flusher may start, the waiters wake.
struct Flushing<'a>(&'a TlsStream);

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        self.0.flushing.set(false);
        for w in self.0.waiting.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

fn tls_error(e: openssl::ssl::Error) -> io::Error {
    match e.into_io_error() {
        Ok(io) => io,
        Err(e) => io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")),
    }
}

impl TlsStream {
    /// Runs the server side of a handshake on `sock`.
    ///
    /// # Errors
    /// `UnexpectedEof` when the client leaves during the handshake; `PermissionDenied` when
    /// the server refuses the client (an unknown or unlisted PSK identity, a certificate that
    /// does not verify or whose DN is not on the allow-list), with the reason; `InvalidData`
    /// with OpenSSL's reason for a failed handshake; the socket's errors.
    pub(crate) async fn accept(sock: Plain, tls: &Tls) -> io::Result<TlsStream> {
        Self::handshake(sock, tls)
            .await
            .map_err(|e| io::Error::new(e.kind(), HandshakeFailed(e.to_string())))
    }

    async fn handshake(sock: Plain, tls: &Tls) -> io::Result<TlsStream> {
        let ssl = Ssl::new(tls.context()).map_err(ssl_err)?;
        let stream = SslStream::new(ssl, Bio::default()).map_err(ssl_err)?;
        let mut t = TlsStream {
            sock,
            ssl: RefCell::new(stream),
            flushing: Cell::new(false),
            waiting: RefCell::new(Vec::new()),
            spare: Cell::new(Vec::new()),
            peer: String::new(),
        };
        // Whatever ends it (an OpenSSL error, the client leaving after an alert), a refusal
        // of the server's own or a failed certificate check is the reason given.
        if let Err(e) = t.exchange().await {
            return Err(t.handshake_failed(e));
        }
        t.peer = t.identify(tls)?;
        Ok(t)
    }

    /// Runs the handshake's messages to the end.
    async fn exchange(&self) -> io::Result<()> {
        loop {
            let r = self.ssl.borrow_mut().accept();
            match r {
                Ok(()) => return self.flush().await,
                Err(e) if e.code() == ErrorCode::WANT_READ => {
                    self.flush().await?;
                    if self.fill().await? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the client closed the connection during the TLS handshake",
                        ));
                    }
                }
                Err(e) => {
                    // The alert, if OpenSSL made one, tells the client why.
                    let _ = self.flush().await;
                    return Err(tls_error(e));
                }
            }
        }
    }

    /// The error for a failed handshake: the server's own reason when it refused the client,
    /// else the certificate check's or OpenSSL's.
    fn handshake_failed(&self, e: io::Error) -> io::Error {
        let s = self.ssl.borrow();
        let ssl = s.ssl();
        if let Some(why) = ssl.ex_data(refusal_index()) {
            return io::Error::new(io::ErrorKind::PermissionDenied, why.clone());
        }
        let verify = ssl.verify_result();
        if verify.as_raw() != 0 {
            return io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the client's certificate: {}", verify.error_string()),
            );
        }
        if let Some(id) = ssl.ex_data(offered_index()) {
            return io::Error::new(e.kind(), format!("PSK identity {id} (a wrong key?): {e}"));
        }
        e
    }

    /// Who the client is, once the handshake is done; refuses a certificate whose DN is not
    /// on the allow-list.
    fn identify(&self, tls: &Tls) -> io::Result<String> {
        let s = self.ssl.borrow();
        let ssl = s.ssl();
        if let Some(id) = ssl.psk_identity() {
            return Ok(String::from_utf8_lossy(id).into_owned());
        }
        let Some(cert) = ssl.peer_certificate() else {
            return Ok(String::new());
        };
        let dn = rfc4514(cert.subject_name());
        if tls.verify_peer() && !tls.allows_certificate(&dn) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "client certificate {} is not on the allow-list",
                    crate::log::client_str(dn.as_bytes())
                ),
            ));
        }
        Ok(dn)
    }

    /// Who the client authenticated as (a PSK username or a certificate DN; "" for neither).
    pub(crate) fn peer(&self) -> &str {
        &self.peer
    }

    /// Reads ciphertext from the socket into OpenSSL's input; returns the count (0 at the end
    /// of the stream).
    async fn fill(&self) -> io::Result<usize> {
        let mut input = {
            let mut s = self.ssl.borrow_mut();
            let bio = s.get_mut();
            let mut input = std::mem::take(&mut bio.input);
            input.drain(..bio.pos);
            bio.pos = 0;
            input
        };
        input.reserve(READ_CHUNK);
        let (res, back) = self.sock.read_more(input).await;
        self.ssl.borrow_mut().get_mut().input = back;
        res
    }

    /// Sends the ciphertext OpenSSL has made, in order, one flusher at a time.
    async fn flush(&self) -> io::Result<()> {
        loop {
            if self.ssl.borrow().get_ref().output.is_empty() {
                return Ok(());
            }
            if self.flushing.get() {
                poll_fn(|cx| {
                    if self.flushing.get() {
                        self.waiting.borrow_mut().push(cx.waker().clone());
                        Poll::Pending
                    } else {
                        Poll::Ready(())
                    }
                })
                .await;
                continue;
            }
            self.flushing.set(true);
            let _end = Flushing(self);
            let out = {
                let mut s = self.ssl.borrow_mut();
                std::mem::replace(&mut s.get_mut().output, self.spare.take())
            };
            let (res, mut out) = self.sock.write_all(out).await;
            out.clear();
            self.spare.set(out);
            res?;
        }
    }

    /// Decrypts into `dst`; returns the count (0 at the end of the stream: the client's
    /// `close_notify`, or the socket's end).
    pub(crate) async fn read(&self, dst: &mut [u8]) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        loop {
            // What a read makes OpenSSL write (the answer to a key update, a warning alert) is
            // left for the writer's next flush, which sends it before its own records, as TLS
            // 1.3 asks: the reader never sends, so a reader dropped mid-read (a shutdown)
            // cannot leave a send half done.
            let r = self.ssl.borrow_mut().ssl_read(dst);
            match r {
                Ok(n) => return Ok(n),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Ok(0),
                Err(e) if e.code() == ErrorCode::WANT_READ => {
                    if self.fill().await? == 0 {
                        return Ok(0);
                    }
                }
                Err(e) => return Err(tls_error(e)),
            }
        }
    }

    /// Encrypts and sends all of `src`.
    ///
    /// At most [`WRITE_CHUNK`] of plaintext is encrypted before its ciphertext is sent, so a
    /// 32 MiB READ reply does not take another 32 MiB of ciphertext.
    pub(crate) async fn write_all(&self, src: &[u8]) -> io::Result<()> {
        for piece in src.chunks(WRITE_CHUNK) {
            let mut done = 0;
            while done < piece.len() {
                let r = self.ssl.borrow_mut().ssl_write(&piece[done..]);
                match r {
                    Ok(n) => done += n,
                    Err(e) => return Err(tls_error(e)),
                }
            }
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends `close_notify` (best effort: the client may be gone).
    pub(crate) async fn close(&self) {
        let r = self.ssl.borrow_mut().shutdown();
        if r.is_ok() {
            let _ = self.flush().await;
        }
    }

    /// Shuts the socket down in both directions.
    pub(crate) fn shutdown(&self) {
        self.sock.shutdown();
    }
}

/// A DN as RFC 4514 writes it (most specific first, `CN=client,O=Example`), as GnuTLS prints
/// it and QEMU's `authz-simple` lists it.
pub(crate) fn rfc4514(name: &X509NameRef) -> String {
    let mut parts: Vec<String> = name
        .entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?").to_string();
            let value = e.data().to_string().unwrap_or_default();
            format!("{key}={}", escape_dn_value(&value))
        })
        .collect();
    parts.reverse();
    parts.join(",")
}

fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.chars().count() && c == ' ');
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape_dn_value;

    #[test]
    fn dn_values_are_escaped_as_rfc4514_says() {
        assert_eq!(escape_dn_value("client"), "client");
        assert_eq!(escape_dn_value("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_dn_value(" lead#"), "\\ lead#");
        assert_eq!(escape_dn_value("#x "), "\\#x\\ ");
    }
}
