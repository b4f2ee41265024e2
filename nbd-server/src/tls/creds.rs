//! Reading TLS credentials: an x509 directory in QEMU's layout, and a `psktool` key file.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::Path;

use openssl::ssl::SslContextBuilder;

use super::ssl_err;

/// Longest PSK accepted, in bytes (OpenSSL's `PSK_MAX_PSK_LEN`).
const MAX_PSK: usize = 512;
/// Longest PSK username (the TLS identity field allows 65535; QEMU's are short).
const MAX_USER: usize = 1024;

/// Pre-shared keys by username, from a file in the format `psktool` writes:
/// `username:hexkey`, one per line.
///
/// ```
/// let keys = nbd_server::tls::PskKeys::parse("alice:0123456789abcdef\n\nbob:ff00\n")?;
/// assert_eq!(keys.get(b"alice"), Some(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef][..]));
/// assert_eq!(keys.len(), 2);
/// assert!(nbd_server::tls::PskKeys::parse("alice:xyz").is_err());
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct PskKeys(HashMap<Vec<u8>, Vec<u8>>);

impl fmt::Debug for PskKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The keys are secrets: only the usernames are shown.
        f.debug_set()
            .entries(self.0.keys().map(|u| String::from_utf8_lossy(u)))
            .finish()
    }
}

impl PskKeys {
    /// Reads `path`.
    ///
    /// # Errors
    /// The file's error, or `InvalidData` naming the path and the line that is not
    /// `username:hexkey`; `InvalidData` for a file with no key.
    pub fn load(path: &Path) -> io::Result<PskKeys> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        PskKeys::parse(&text)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// Parses the text of a key file (blank lines are skipped; a later line for the same
    /// user replaces an earlier one).
    ///
    /// # Errors
    /// `InvalidData` naming the first bad line, or for text with no key.
    pub fn parse(text: &str) -> io::Result<PskKeys> {
        let bad = |n: usize, why: &str| {
            io::Error::new(io::ErrorKind::InvalidData, format!("line {n}: {why}"))
        };
        let mut keys = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((user, hex)) = line.rsplit_once(':') else {
                return Err(bad(i + 1, "not username:hexkey"));
            };
            if user.is_empty() || user.len() > MAX_USER {
                return Err(bad(i + 1, "the username is empty or too long"));
            }
            let key = decode_hex(hex.trim()).ok_or_else(|| bad(i + 1, "the key is not hex"))?;
            if key.is_empty() || key.len() > MAX_PSK {
                return Err(bad(i + 1, "the key must be 1 to 512 bytes"));
            }
            keys.insert(user.as_bytes().to_vec(), key);
        }
        if keys.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no key in it"));
        }
        Ok(PskKeys(keys))
    }

    /// The key of `user`.
    pub fn get(&self, user: &[u8]) -> Option<&[u8]> {
        self.0.get(user).map(Vec::as_slice)
    }

    /// How many users have a key.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no user has a key (never, for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

/// Loads `server-cert.pem`, `server-key.pem` and (when client certificates are verified)
/// `ca-cert.pem` from `dir` into `b`.
pub(super) fn load_x509(
    b: &mut SslContextBuilder,
    dir: &Path,
    verify_peer: bool,
) -> io::Result<()> {
    let named = |file: &str, e: openssl::error::ErrorStack| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: {}", dir.join(file).display(), ssl_err(e)),
        )
    };
    for file in ["server-cert.pem", "server-key.pem"] {
        let p = dir.join(file);
        std::fs::metadata(&p)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
    }
    b.set_certificate_chain_file(dir.join("server-cert.pem"))
        .map_err(|e| named("server-cert.pem", e))?;
    b.set_private_key_file(dir.join("server-key.pem"), openssl::ssl::SslFiletype::PEM)
        .map_err(|e| named("server-key.pem", e))?;
    b.check_private_key()
        .map_err(|e| named("server-key.pem (does it match server-cert.pem?)", e))?;
    let ca = dir.join("ca-cert.pem");
    if verify_peer {
        b.set_ca_file(&ca).map_err(|e| named("ca-cert.pem", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files() {
        let k = PskKeys::parse("alice:00ff\r\nbob:0102\nalice:aa\n").unwrap();
        assert_eq!(k.get(b"alice"), Some(&[0xaa][..]), "the later line wins");
        assert_eq!(k.get(b"bob"), Some(&[1, 2][..]));
        assert_eq!(k.get(b"carol"), None);
        assert!(!format!("{k:?}").contains("aa"), "keys stay out of logs");
        for (text, line) in [
            ("alice", "line 1"),
            ("\nalice:0", "line 2"),
            (":00", "line 1"),
            ("a:zz", "line 1"),
            ("a:", "line 1"),
        ] {
            let e = PskKeys::parse(text).unwrap_err();
            assert!(e.to_string().contains(line), "{text:?}: {e}");
        }
        assert!(PskKeys::parse("\n\n").is_err(), "no key");
        let long = format!("a:{}", "00".repeat(513));
        assert!(PskKeys::parse(&long).is_err());
    }
}
