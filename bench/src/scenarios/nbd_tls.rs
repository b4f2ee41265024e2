//! `nbd-tls`: the servers of [`super::nbd_servers`] with TLS required, with the same keys:
//! `nbdcopy` of the whole export over pre-shared keys and over x509 certificates (requests
//! of 256 KiB), and fio's NBD engine at queue depth 1 and 32 over x509 (fio's engine cannot
//! pass a key file in its URI, so PSK has no fio row). Each row also has nbd-server on
//! io_uring without TLS (`reactor-uring-plaintext`), the reference for what TLS costs.
//! Requests/s, and the server's CPU per request. The credentials are made for the run with
//! the `openssl` program.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::nbd_fio::{self, Case};
use super::nbd_servers::{Fleet, Running, SERVERS, Server, Setup, up};
use super::{Ctx, Row, System};
use crate::measure::{Metric, Sample};

/// nbdcopy's request size, set so that a row's requests are known.
const COPY_REQUEST: u64 = 256 << 10;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes the run's credentials under `dir`: `server/` (ca-cert.pem, server-cert.pem for
/// localhost and 127.0.0.1, server-key.pem), `keys.psk` (alice), and `home/.pki/libnbd/`
/// with the CA, where libnbd looks for it when a URI names no directory.
pub fn tls_creds(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let libnbd = dir.join("home/.pki/libnbd");
    std::fs::create_dir_all(dir.join("server")).expect("create the credentials' directory");
    std::fs::create_dir_all(&libnbd).expect("create the client's CA directory");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        "server/ca-cert.pem",
        "-days",
        "7",
        "-subj",
        "/CN=bench CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server/server-key.pem",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "server/ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "server/server-cert.pem",
            "-days",
            "7",
            "-extfile",
            "ext",
        ],
    );
    std::fs::copy(dir.join("server/ca-cert.pem"), libnbd.join("ca-cert.pem")).unwrap();
    let key: String = (0..32u32)
        .map(|i| format!("{:02x}", (i * 97 + 13) as u8))
        .collect();
    std::fs::write(dir.join("keys.psk"), format!("alice:{key}\n")).unwrap();
}

/// One `nbdcopy` of the whole export to `null:`, timed: requests/s and the server's CPU per
/// request.
fn copy(srv: &Running, size: u64) -> Sample {
    let cpu0 = srv.cpu();
    let t0 = Instant::now();
    let out = Command::new("nbdcopy")
        .args([
            &format!("--request-size={COPY_REQUEST}"),
            srv.url.as_str(),
            "null:",
        ])
        .envs(srv.client_env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run nbdcopy");
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "nbdcopy {} failed: {}",
        srv.url,
        String::from_utf8_lossy(&out.stderr)
    );
    let requests = size / COPY_REQUEST;
    Sample::timed(Metric::OpsPerSec, requests, took).with_cpu_of(srv.cpu().since(cpu0), requests)
}

pub fn run(ctx: &Ctx) -> Vec<Row> {
    assert!(
        nbd_fio::available() && super::nbd_servers::available(),
        "the nbd-tls scenario needs fio (with its nbd engine), qemu-storage-daemon, qemu-nbd, \
         nbdkit, nbdcopy and openssl on the PATH (Debian/Ubuntu: apt-get install fio \
         qemu-utils nbdkit libnbd-bin openssl)"
    );
    let dir = Path::new("target").join("bench-data");
    let creds: PathBuf = std::env::current_dir().unwrap().join(dir.join("tls-creds"));
    tls_creds(&creds);
    let size = ctx.scale(1 << 30, 64 << 20);
    // One fleet per kind of credentials, and the plaintext reference.
    let mut fleets = Vec::new();
    for (kind, setup) in [
        ("psk", Setup::TlsPsk(creds.clone())),
        ("x509", Setup::TlsX509(creds.clone())),
    ] {
        let mut fleet = Fleet::default();
        for server in SERVERS {
            let system = server.system();
            let path = dir.join(format!("nbd-tls-{kind}-{system}.img"));
            fleet.start_setup(system, server, path, None, &setup, size);
        }
        fleets.push((kind, fleet));
    }
    let mut plain = Fleet::default();
    let path = dir.join("nbd-tls-plaintext.img");
    plain.start_setup(
        "reactor-uring-plaintext".into(),
        Server::Reactor("uring"),
        path,
        None,
        &Setup::Plain,
        size,
    );
    let reference = &plain.servers[0];
    let mut rows = Vec::new();
    for (kind, fleet) in &fleets {
        let mut systems = Vec::new();
        for (system, _, srv) in fleet.servers.iter().chain(std::iter::once(reference)) {
            systems.push(System::new(system.as_str(), move || {
                copy(up(system, srv), size)
            }));
        }
        rows.extend(ctx.interleave(
            &format!("nbd-tls-copy-{kind}-256k"),
            Metric::OpsPerSec,
            systems,
        ));
    }
    let x509 = &fleets[1].1;
    for (depth, requests) in [
        (1, ctx.scale(20_000, 1_500)),
        (32, ctx.scale(100_000, 6_000)),
    ] {
        let case = Case {
            rw: "randread",
            depth,
            jobs: 1,
            requests,
        };
        let mut systems = Vec::new();
        for (system, path, srv) in x509.servers.iter().chain(std::iter::once(reference)) {
            systems.push(System::new(system.as_str(), move || {
                let srv = up(system, srv);
                let sample = nbd_fio::client_run(srv, case, "64M");
                // A server that answers quickly with the wrong bytes fails its row.
                super::nbd_servers::check_reads(srv, path, system);
                sample
            }));
        }
        rows.extend(ctx.interleave(
            &case.name_in("nbd-tls-x509-fio"),
            Metric::OpsPerSec,
            systems,
        ));
    }
    drop(fleets);
    drop(plain);
    let _ = std::fs::remove_dir_all(&creds);
    rows
}
