//! TLS for NBD (`NBD_OPT_STARTTLS`): the server's credentials and policy, loaded once at
//! start ([`Tls`]), and the encrypted stream a connection switches to ([`stream`]).
//!
//! Credentials come in the layouts QEMU and nbdkit use, so the same files serve all three:
//! - x509: a directory with `server-cert.pem` (the certificate, optionally followed by its
//!   chain), `server-key.pem`, and `ca-cert.pem` (the CA that client certificates must chain
//!   to; needed with [`TlsOptions::verify_peer`]);
//! - pre-shared keys: a file of `username:hexkey` lines, as `psktool` writes them.
//!
//! The library is the system's OpenSSL 3 through the `openssl` crate: rustls has no external
//! pre-shared keys and BoringSSL does not expose them for TLS 1.3, and both are needed to
//! speak to GnuTLS clients (libnbd, QEMU) with `tls-creds-psk`.

mod creds;
pub(crate) mod stream;

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use openssl::ssl::{SslContext, SslContextBuilder, SslMethod, SslOptions, SslVerifyMode};
use openssl::ssl::{SslMode, SslVersion};

pub use creds::PskKeys;

/// Whether clients may, must or cannot use TLS (`--tls`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// `NBD_OPT_STARTTLS` is refused (`NBD_REP_ERR_POLICY`); plaintext only.
    #[default]
    Off,
    /// Clients choose: plaintext, or TLS after `NBD_OPT_STARTTLS`.
    On,
    /// Every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with
    /// `NBD_REP_ERR_TLS_REQD` until TLS is up, and `NBD_OPT_EXPORT_NAME` closes the
    /// connection.
    Require,
}

/// Where the server's TLS credentials come from, and whom it accepts.
///
/// ```
/// use nbd_server::tls::TlsOptions;
/// let o = TlsOptions {
///     psk: Some("/etc/nbd/keys.psk".into()),
///     allow: vec!["alice".into()],
///     ..TlsOptions::default()
/// };
/// assert!(o.certificates.is_none() && !o.verify_peer);
/// ```
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// A directory with `server-cert.pem`, `server-key.pem` and (for
    /// [`verify_peer`](Self::verify_peer)) `ca-cert.pem`.
    pub certificates: Option<PathBuf>,
    /// A `psktool` file: `username:hexkey` per line.
    pub psk: Option<PathBuf>,
    /// Ask clients for a certificate signed by `ca-cert.pem`, and refuse those without one.
    pub verify_peer: bool,
    /// Client identities let in (empty: all that authenticate): a PSK username, or a
    /// certificate's subject DN as RFC 4514 writes it (`CN=client,O=Example`), as QEMU's
    /// `authz-simple` and GnuTLS print it.
    pub allow: Vec<String>,
}

/// The server's TLS setup: the mode, and an OpenSSL context holding the credentials, made
/// once at start and shared by every connection.
///
/// ```no_run
/// use nbd_server::tls::{Tls, TlsMode, TlsOptions};
/// let opts = TlsOptions { certificates: Some("/etc/pki/qemu".into()), ..Default::default() };
/// let tls = Tls::new(TlsMode::Require, &opts)?;
/// assert_eq!(tls.mode(), TlsMode::Require);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Tls {
    mode: TlsMode,
    context: SslContext,
    allow: Option<HashSet<String>>,
    verify_peer: bool,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("allow", &self.allow)
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the credentials `opts` names.
    ///
    /// # Errors
    /// `InvalidInput` for a mode other than `Off` without credentials, credentials with mode
    /// `Off`, an allow-list of certificate DNs without `verify_peer`, or `verify_peer`
    /// without certificates; the file's error, with its path, for a credential that cannot
    /// be read or parsed (a PSK file's bad line is named by number).
    pub fn new(mode: TlsMode, opts: &TlsOptions) -> io::Result<Tls> {
        let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
        let has_creds = opts.certificates.is_some() || opts.psk.is_some();
        match mode {
            TlsMode::Off if has_creds || opts.verify_peer || !opts.allow.is_empty() => {
                return Err(invalid(
                    "TLS credentials or options were given with --tls off",
                ));
            }
            TlsMode::On | TlsMode::Require if !has_creds => {
                return Err(invalid(
                    "--tls on/require needs --tls-certificates DIR or --tls-psk FILE",
                ));
            }
            _ => {}
        }
        if opts.verify_peer && opts.certificates.is_none() {
            return Err(invalid(
                "--tls-verify-peer needs --tls-certificates DIR (its ca-cert.pem)",
            ));
        }
        let psk = opts.psk.as_deref().map(PskKeys::load).transpose()?;
        if !opts.allow.is_empty() && !opts.verify_peer {
            // Without client certificates the only identities are PSK usernames.
            if psk.is_none() || opts.certificates.is_some() {
                return Err(invalid(
                    "--tls-allow of certificate names needs --tls-verify-peer (without it, \
                     a client authenticates by PSK username only)",
                ));
            }
        }
        let allow = (!opts.allow.is_empty()).then(|| opts.allow.iter().cloned().collect());
        let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(ssl_err)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(ssl_err)?;
        // TLS 1.2 suites with forward secrecy, and the PSK ones GnuTLS offers.
        b.set_cipher_list("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:ECDHE-PSK:DHE-PSK:PSK+AESGCM")
            .map_err(ssl_err)?;
        // TLS 1.3: the SHA-256 suites first, chosen by the server. OpenSSL's PSK callback
        // gives a SHA-256 key, usable only under a SHA-256 suite: GnuTLS clients list
        // AES-256-GCM-SHA384 first, and taking it would drop the PSK and fall back to
        // certificates (or fail, without them).
        b.set_ciphersuites(
            "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384",
        )
        .map_err(ssl_err)?;
        // No session resumption (each connection is long-lived), no renegotiation (so a
        // write never needs a read), and writes may leave the buffer they came from.
        b.set_options(
            SslOptions::NO_TICKET
                | SslOptions::NO_RENEGOTIATION
                | SslOptions::CIPHER_SERVER_PREFERENCE,
        );
        b.set_num_tickets(0).map_err(ssl_err)?;
        b.set_mode(SslMode::ACCEPT_MOVING_WRITE_BUFFER);
        // A PSK is a session to OpenSSL, which it takes with client verification on only
        // under a session id context.
        b.set_session_id_context(b"nbd-server").map_err(ssl_err)?;
        if let Some(dir) = &opts.certificates {
            creds::load_x509(&mut b, dir, opts.verify_peer)?;
        }
        if opts.verify_peer {
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        } else {
            b.set_verify(SslVerifyMode::NONE);
        }
        if let Some(keys) = psk {
            let keys = Arc::new(keys);
            let allow: Option<HashSet<String>> = allow.clone();
            b.set_psk_server_callback(move |ssl, identity, out| {
                let id = identity.unwrap_or_default();
                stream::set_offered(ssl, id);
                let mut refused = |why: String| {
                    stream::set_refusal(ssl, why);
                    Err(openssl::error::ErrorStack::get())
                };
                let Some(key) = keys.get(id) else {
                    return refused(format!(
                        "unknown PSK identity {}",
                        crate::log::client_str(id)
                    ));
                };
                if let Some(allow) = &allow {
                    if !std::str::from_utf8(id).is_ok_and(|u| allow.contains(u)) {
                        return refused(format!(
                            "PSK identity {} is not on the allow-list",
                            crate::log::client_str(id)
                        ));
                    }
                }
                if key.len() > out.len() {
                    return refused("the PSK is longer than OpenSSL takes".into());
                }
                out[..key.len()].copy_from_slice(key);
                Ok(key.len())
            });
        }
        Ok(Tls {
            mode,
            context: b.build(),
            allow,
            verify_peer: opts.verify_peer,
        })
    }

    /// The mode it was made with.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Whether STARTTLS is accepted at all.
    pub(crate) fn offered(&self) -> bool {
        self.mode != TlsMode::Off
    }

    /// Whether a client certificate with this subject DN (RFC 4514) is let in.
    pub(crate) fn allows_certificate(&self, dn: &str) -> bool {
        self.allow.as_ref().is_none_or(|a| a.contains(dn))
    }

    pub(crate) fn context(&self) -> &SslContext {
        &self.context
    }

    pub(crate) fn verify_peer(&self) -> bool {
        self.verify_peer
    }
}

/// OpenSSL's error stack as an `io::Error`.
pub(crate) fn ssl_err(e: openssl::error::ErrorStack) -> io::Error {
    io::Error::other(format!("TLS: {e}"))
}
