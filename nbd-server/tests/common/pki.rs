//! TLS credentials made by the tests (never committed): a CA, a server certificate for
//! 127.0.0.1/localhost, client certificates (good, expired, from another CA), in the
//! directory layouts QEMU, nbdkit and libnbd read; and `psktool`-format key files.

use std::path::{Path, PathBuf};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509, X509NameBuilder};

/// A key pair (ECDSA P-256: quick to make and to use).
pub fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

/// What a certificate is for.
#[derive(Clone, Copy, PartialEq)]
pub enum Role {
    Ca,
    Server,
    Client,
}

/// A certificate for `cn` (and `o`) signed by `issuer` (self-signed when `None`), valid from
/// `from_days` to `to_days` relative to now.
pub fn cert(
    role: Role,
    cn: &str,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    from_days: i64,
    to_days: i64,
) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("O", "reactor tests").unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map_or(&*name, |(c, _)| c.subject_name()))
        .unwrap();
    b.set_pubkey(key).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    b.set_not_before(&Asn1Time::from_unix(now + from_days * 86400).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::from_unix(now + to_days * 86400).unwrap())
        .unwrap();
    match role {
        Role::Ca => {
            b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
                .unwrap();
            let ku = KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build();
            b.append_extension(ku.unwrap()).unwrap();
        }
        Role::Server | Role::Client => {
            b.append_extension(BasicConstraints::new().critical().build().unwrap())
                .unwrap();
            let ku = KeyUsage::new()
                .critical()
                .digital_signature()
                .key_encipherment()
                .build();
            b.append_extension(ku.unwrap()).unwrap();
            let mut eku = ExtendedKeyUsage::new();
            if role == Role::Server {
                eku.server_auth();
            } else {
                eku.client_auth();
            }
            b.append_extension(eku.build().unwrap()).unwrap();
        }
    }
    if role == Role::Server {
        let ctx = b.x509v3_context(issuer.map(|(c, _)| &**c), None);
        let san = SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .dns("localhost")
            .build(&ctx)
            .unwrap();
        b.append_extension(san).unwrap();
    }
    let signer = issuer.map_or(key, |(_, k)| k);
    b.sign(signer, MessageDigest::sha256()).unwrap();
    b.build()
}

fn write_pem(path: &Path, pem: &[u8]) {
    std::fs::write(path, pem).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Credentials for one test, under a directory of their own.
pub struct Pki {
    pub root: PathBuf,
    /// The server's directory: ca-cert.pem, server-cert.pem, server-key.pem.
    pub server: PathBuf,
    /// A client's directory (libnbd's and QEMU's layout: ca-cert.pem, client-cert.pem,
    /// client-key.pem), by name: "good" (CN=client), "other" (CN=stranger), "expired",
    /// "foreign" (signed by another CA), "nocert" (the CA alone), "distrust" (a client
    /// certificate from the right CA, but trusting another CA for the server).
    pub clients: Vec<(String, PathBuf)>,
    /// A psktool file with `alice` and `bob`.
    pub psk: PathBuf,
    /// The same keys, one file per user in QEMU's `tls-creds-psk` layout (`DIR/keys.psk`).
    pub qemu_psk: PathBuf,
}

/// The DN of the "good" client certificate, as RFC 4514 writes it.
pub const GOOD_DN: &str = "CN=client,O=reactor tests";

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("pki-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let server = root.join("server");
        std::fs::create_dir_all(&server).unwrap();
        let ca_key = key();
        let ca = cert(Role::Ca, "test CA", &ca_key, None, -1, 30);
        let ca_pem = ca.to_pem().unwrap();
        let other_ca_key = key();
        let other_ca = cert(Role::Ca, "other CA", &other_ca_key, None, -1, 30);
        let skey = key();
        let scert = cert(
            Role::Server,
            "localhost",
            &skey,
            Some((&ca, &ca_key)),
            -1,
            30,
        );
        write_pem(&server.join("ca-cert.pem"), &ca_pem);
        write_pem(&server.join("server-cert.pem"), &scert.to_pem().unwrap());
        write_pem(
            &server.join("server-key.pem"),
            &skey.private_key_to_pem_pkcs8().unwrap(),
        );
        let mut clients = Vec::new();
        for (name, cn, from, to, foreign) in [
            ("good", "client", -1, 30, false),
            ("other", "stranger", -1, 30, false),
            ("expired", "client", -30, -1, false),
            ("foreign", "client", -1, 30, true),
            ("nocert", "", 0, 0, false),
            ("distrust", "client", -1, 30, false),
        ] {
            let dir = root.join(format!("client-{name}"));
            std::fs::create_dir_all(&dir).unwrap();
            let trusted = if name == "distrust" {
                other_ca.to_pem().unwrap()
            } else {
                ca_pem.clone()
            };
            write_pem(&dir.join("ca-cert.pem"), &trusted);
            if name != "nocert" {
                let k = key();
                let issuer = if foreign {
                    (&other_ca, &other_ca_key)
                } else {
                    (&ca, &ca_key)
                };
                let c = cert(Role::Client, cn, &k, Some(issuer), from, to);
                write_pem(&dir.join("client-cert.pem"), &c.to_pem().unwrap());
                write_pem(
                    &dir.join("client-key.pem"),
                    &k.private_key_to_pem_pkcs8().unwrap(),
                );
            }
            clients.push((name.to_string(), dir));
        }
        let psk = root.join("keys.psk");
        std::fs::write(&psk, format!("alice:{ALICE_KEY}\nbob:{BOB_KEY}\n")).unwrap();
        let qemu_psk = root.join("qemu-psk");
        std::fs::create_dir_all(&qemu_psk).unwrap();
        std::fs::copy(&psk, qemu_psk.join("keys.psk")).unwrap();
        Pki {
            root,
            server,
            clients,
            psk,
            qemu_psk,
        }
    }

    /// A client's directory by name (see [`Pki::clients`]).
    pub fn client(&self, name: &str) -> &Path {
        &self
            .clients
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no client {name}"))
            .1
    }

    /// A key file for `carol`, whom the server does not know.
    pub fn stranger_psk(&self) -> PathBuf {
        let p = self.root.join("carol.psk");
        std::fs::write(&p, format!("carol:{ALICE_KEY}\n")).unwrap();
        p
    }

    /// A key file with a wrong key for `alice`.
    pub fn wrong_psk(&self) -> PathBuf {
        let p = self.root.join("wrong.psk");
        std::fs::write(&p, format!("alice:{}\n", "ab".repeat(32))).unwrap();
        p
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Alice's key (32 bytes, as `psktool` makes them).
pub const ALICE_KEY: &str = "3d95525ec826738c6064160df4e621b21757d62fbd909b6dc8efcb41861ceea9";
const BOB_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
