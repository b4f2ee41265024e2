//! TLS (`NBD_OPT_STARTTLS`) on both backends: libnbd (`nbdinfo`, `nbdcopy`, the Python
//! bindings' strict client) and QEMU (`qemu-img`, `qemu-io` with `tls-creds-x509` and
//! `tls-creds-psk`) over certificates and pre-shared keys; refusals (plaintext under
//! `require`, wrong key, unlisted or expired or untrusted certificates), each with its log
//! line; the state negotiated before STARTTLS forgotten after it; stalled and garbage
//! handshakes cut without the server growing. Credentials are made by the tests
//! (`common/pki.rs`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pki::{self, GOOD_DN, Pki};
use common::served::{Served, random_bytes, run, scratch, serve_logging};
use common::{Client, opt, proto, rep};
use openssl::ssl::{SslConnector, SslMethod, SslStream, SslVerifyMode};
use tests::backend_tests;

const MIB: u64 = 1 << 20;
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/libnbd_check.py");
/// `libnbd_check.py`'s checks, one "ok" line each.
const CHECKS: usize = 11;

/// The server with its log in a file, which `log()` reads.
struct Logged {
    srv: Served,
    log: PathBuf,
}

impl Logged {
    fn start(backend: &str, file: &Path, extra: &[&str]) -> Logged {
        let log = PathBuf::from(format!("{}.log", file.display()));
        let f = std::fs::File::create(&log).unwrap();
        let srv = serve_logging(backend, file, extra, Stdio::from(f));
        Logged { srv, log }
    }

    fn addr(&self) -> SocketAddr {
        let a = self.srv.url.strip_prefix("nbd://").unwrap();
        a.strip_suffix("/disk").unwrap().parse().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// The libnbd URI of the export over TLS, with `query` (`tls-psk-file=...`).
    fn nbds(&self, user: Option<&str>, host: &str, query: &str) -> String {
        let user = user.map(|u| format!("{u}@")).unwrap_or_default();
        format!("nbds://{user}{host}:{}/disk?{query}", self.addr().port())
    }

    /// Waits (up to 5 s) for a log line containing `what`; panics with the log otherwise.
    fn expect_log(&self, what: &str) {
        let t0 = Instant::now();
        while !self.log().contains(what) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no log line with {what:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A 64 MiB export whose only data is [4 MiB, 6 MiB), as `libnbd_check.py` expects.
fn export_for_script(tag: &str, backend: &str) -> PathBuf {
    let export = scratch(tag, backend);
    let f = std::fs::File::create(&export).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.write_all_at(&random_bytes(2 * MIB as usize, 7), 4 * MIB)
        .unwrap();
    export
}

/// `nbdinfo`, then `nbdcopy` of 8 MiB in and out, then the Python strict client, over `url`.
fn libnbd_round_trip(url: &str, export: &Path, backend: &str) {
    let info = run("nbdinfo", &[url]);
    assert!(info.contains("with TLS"), "{info}");
    // The strict client first, on the layout it expects.
    let out = run("/usr/bin/python3", &[SCRIPT, url, export.to_str().unwrap()]);
    let passed = out.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(passed, CHECKS, "{out}");
    let src = scratch("tls-src", backend);
    let back = scratch("tls-back", backend);
    std::fs::write(&src, random_bytes(8 * MIB as usize, 11)).unwrap();
    run("nbdcopy", &[src.to_str().unwrap(), url]);
    run("nbdcopy", &[url, back.to_str().unwrap()]);
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len() as u64, 64 * MIB);
    assert!(got[..8 * MIB as usize] == std::fs::read(&src).unwrap()[..]);
    assert!(
        got == std::fs::read(export).unwrap(),
        "the copy is the file"
    );
    let _ = std::fs::remove_file(src);
    let _ = std::fs::remove_file(back);
}

/// `qemu-img convert` out of the export and `qemu-io` writes and reads through it, with the
/// TLS object `object` (its id `tls0`).
fn qemu_round_trip(addr: SocketAddr, host: &str, object: &str, backend: &str) {
    let opts = format!(
        "driver=nbd,host={host},port={},export=disk,tls-creds=tls0",
        addr.port()
    );
    let pattern = run(
        "qemu-io",
        &[
            "--object",
            object,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x5a 32M 1M",
            "-c",
            "read -P 0x5a 32M 1M",
        ],
    );
    assert!(
        !pattern.contains("Pattern verification failed"),
        "{pattern}"
    );
    let copy = scratch("tls-qemu-copy", backend);
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            object,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            copy.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&copy).unwrap();
    assert_eq!(got.len() as u64, 64 * MIB);
    assert!(
        got[32 * MIB as usize..33 * MIB as usize]
            .iter()
            .all(|&b| b == 0x5a)
    );
    let _ = std::fs::remove_file(copy);
}

/// Runs `tool args`; returns whether it succeeded (its output is not checked).
fn succeeds(tool: &str, args: &[&str]) -> bool {
    Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
        .success()
}

/// Sends the greeting's answer and `NBD_OPT_STARTTLS`; returns the socket after the ACK.
fn starttls(addr: SocketAddr) -> Client {
    let mut c = Client::connect(addr);
    c.handshake(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    c.option(opt::STARTTLS, &[]);
    let r = c.opt_reply();
    assert_eq!((r.option, r.kind), (opt::STARTTLS, rep::ACK));
    c
}

/// An OpenSSL client over `s` that authenticates as alice.
fn psk_client(s: TcpStream) -> SslStream<TcpStream> {
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_psk_client_callback(|_, _hint, identity, psk| {
        identity[..5].copy_from_slice(b"alice");
        identity[5] = 0;
        let key: Vec<u8> = (0..pki::ALICE_KEY.len() / 2)
            .map(|i| u8::from_str_radix(&pki::ALICE_KEY[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        psk[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    let mut cfg = b.build().configure().unwrap();
    cfg.set_verify_hostname(false);
    cfg.connect("localhost", s).expect("the TLS handshake")
}

/// One option over TLS: its replies until the final one.
fn tls_option(t: &mut SslStream<TcpStream>, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut m = Vec::new();
    m.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    t.write_all(&m).unwrap();
    let mut replies = Vec::new();
    loop {
        let mut h = [0u8; 20];
        t.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), option);
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        t.read_exact(&mut d).unwrap();
        replies.push((kind, d));
        if kind != rep::INFO && kind != rep::META_CONTEXT && kind != rep::SERVER {
            return replies;
        }
    }
}

/// A real ClientHello, as OpenSSL's client writes it first.
fn client_hello() -> Vec<u8> {
    #[derive(Default)]
    struct Capture(Vec<u8>);
    impl Read for Capture {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
    }
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let c = SslConnector::builder(SslMethod::tls_client())
        .unwrap()
        .build();
    match c
        .configure()
        .unwrap()
        .connect("localhost", Capture::default())
    {
        Err(openssl::ssl::HandshakeError::WouldBlock(mid)) => mid.get_ref().0.clone(),
        _ => panic!("the client should wait for the server's answer"),
    }
}

/// The server's resident set (kB).
fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

backend_tests! {
    fn psk_with_libnbd_and_qemu(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let pki = Pki::new(&format!("psk-{backend}"));
        let export = export_for_script("tls-psk", backend);
        let psk = pki.psk.to_str().unwrap();
        let srv = Logged::start(backend, &export, &["--tls", "require", "--tls-psk", psk]);
        let url = srv.nbds(Some("alice"), "127.0.0.1", &format!("tls-psk-file={psk}"));
        libnbd_round_trip(&url, &export, backend);
        let object = format!(
            "tls-creds-psk,id=tls0,endpoint=client,dir={},username=alice",
            pki.qemu_psk.display()
        );
        qemu_round_trip(srv.addr(), "127.0.0.1", &object, backend);
        drop(srv);
        std::fs::remove_file(export).unwrap();
    }

    fn x509_with_libnbd_and_qemu(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let pki = Pki::new(&format!("x509-{backend}"));
        let export = export_for_script("tls-x509", backend);
        let dir = pki.server.to_str().unwrap();
        let srv = Logged::start(
            backend,
            &export,
            &["--tls", "require", "--tls-certificates", dir, "--tls-verify-peer", "--tls-allow", GOOD_DN],
        );
        let client = pki.client("good").to_str().unwrap();
        let url = srv.nbds(None, "localhost", &format!("tls-certificates={client}"));
        libnbd_round_trip(&url, &export, backend);
        let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={client}");
        qemu_round_trip(srv.addr(), "localhost", &object, backend);
        drop(srv);
        std::fs::remove_file(export).unwrap();
    }

    fn refusals_each_with_a_log_line(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let pki = Pki::new(&format!("refuse-{backend}"));
        let export = scratch("tls-refuse", backend);
        std::fs::File::create(&export).unwrap().set_len(MIB).unwrap();
        let (dir, psk) = (pki.server.to_str().unwrap(), pki.psk.to_str().unwrap());
        let srv = Logged::start(
            backend,
            &export,
            &[
                "--tls", "require", "--tls-certificates", dir, "--tls-psk", psk,
                "--tls-verify-peer", "--tls-allow", GOOD_DN, "--tls-allow", "alice",
            ],
        );
        // Plaintext against require: every option but STARTTLS and ABORT is refused with
        // TLS_REQD, and the negotiation stays usable; EXPORT_NAME closes.
        let mut c = Client::connect(srv.addr());
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
        for o in [opt::LIST, opt::STRUCTURED_REPLY, opt::INFO, opt::GO, opt::SET_META_CONTEXT, 4242] {
            c.option(o, &[]);
            let r = c.opt_reply();
            assert_eq!((r.option, r.kind), (o, rep::ERR_TLS_REQD), "option {o}");
        }
        c.option(opt::EXPORT_NAME, b"disk");
        assert!(c.closed_by_server());
        let mut c = Client::connect(srv.addr());
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
        c.option(opt::ABORT, &[]);
        assert_eq!(c.opt_reply().kind, rep::ACK);
        // libnbd's plaintext client is refused too.
        assert!(!succeeds("nbdinfo", &[&srv.srv.url]));
        // Each refused handshake: the client fails, the server says why. (Failed handshakes
        // are logged at most once a second, so the attempts are spaced.)
        let cert = |name: &str| format!("tls-certificates={}", pki.client(name).display());
        let (wrong, stranger) = (pki.wrong_psk(), pki.stranger_psk());
        let cases = [
            (srv.nbds(None, "localhost", &cert("other")), "CN=stranger,O=reactor tests\" is not on the allow-list"),
            (srv.nbds(None, "localhost", &cert("expired")), "certificate has expired"),
            (srv.nbds(None, "localhost", &cert("foreign")), "the client's certificate"),
            (srv.nbds(None, "localhost", &cert("nocert")), "TLS handshake"),
            (srv.nbds(Some("bob"), "localhost", &format!("tls-psk-file={psk}")), "\"bob\" is not on the allow-list"),
            (srv.nbds(Some("alice"), "localhost", &format!("tls-psk-file={}", wrong.display())), "PSK identity \"alice\" (a wrong key?)"),
            (srv.nbds(Some("carol"), "localhost", &format!("tls-psk-file={}", stranger.display())), "unknown PSK identity \"carol\""),
        ];
        for (i, (url, why)) in cases.iter().enumerate() {
            std::thread::sleep(Duration::from_millis(1100));
            let before = srv.log().matches("TLS handshake").count();
            assert!(!succeeds("nbdinfo", &[url]), "case {i}: {url} was let in");
            srv.expect_log(why);
            let t0 = Instant::now();
            while srv.log().matches("TLS handshake").count() == before {
                assert!(t0.elapsed() < Duration::from_secs(5), "case {i}: no new line:\n{}", srv.log());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // A client that does not trust the server's CA refuses it.
        assert!(!succeeds("nbdinfo", &[&srv.nbds(None, "localhost", &cert("distrust"))]));
        // And the right credentials still get in.
        assert!(run("nbdinfo", &[&srv.nbds(None, "localhost", &cert("good"))]).contains("with TLS"));
        let alice = srv.nbds(Some("alice"), "localhost", &format!("tls-psk-file={psk}"));
        assert!(run("nbdinfo", &[&alice]).contains("with TLS"));
        drop(srv);
        std::fs::remove_file(export).unwrap();
    }

    fn options_negotiated_before_starttls_are_forgotten(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let pki = Pki::new(&format!("reset-{backend}"));
        let export = scratch("tls-reset", backend);
        std::fs::write(&export, random_bytes(MIB as usize, 3)).unwrap();
        let psk = pki.psk.to_str().unwrap();
        let srv = Logged::start(backend, &export, &["--tls", "on", "--tls-psk", psk]);
        let mut c = Client::connect(srv.addr());
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        // In clear: structured replies, extended headers, base:allocation.
        c.option(opt::STRUCTURED_REPLY, &[]);
        assert_eq!(c.opt_reply().kind, rep::ACK);
        c.option(opt::EXTENDED_HEADERS, &[]);
        assert_eq!(c.opt_reply().kind, rep::ACK);
        let mut meta = Vec::new();
        meta.extend_from_slice(&4u32.to_be_bytes());
        meta.extend_from_slice(b"disk");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        c.option(opt::SET_META_CONTEXT, &meta);
        assert_eq!(c.opt_reply().kind, rep::META_CONTEXT);
        assert_eq!(c.opt_reply().kind, rep::ACK);
        c.option(opt::STARTTLS, &[]);
        assert_eq!(c.opt_reply().kind, rep::ACK);
        let mut t = psk_client(c.s.try_clone().unwrap());
        // Over TLS, GO: the transmission flags say no structured replies (no DF).
        let mut go = Vec::new();
        go.extend_from_slice(&4u32.to_be_bytes());
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&0u16.to_be_bytes());
        let replies = tls_option(&mut t, opt::GO, &go);
        assert_eq!(replies.last().unwrap().0, rep::ACK);
        let export_info = &replies[0].1;
        let flags = u16::from_be_bytes([export_info[10], export_info[11]]);
        assert_eq!(flags & proto::tflag::SEND_DF, 0, "structured replies were forgotten");
        // A compact (28-byte) READ gets a simple reply: neither extended headers nor
        // structured replies survived STARTTLS.
        let mut req = Vec::new();
        req.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&proto::cmd::READ.to_be_bytes());
        req.extend_from_slice(&7u64.to_be_bytes());
        req.extend_from_slice(&4096u64.to_be_bytes());
        req.extend_from_slice(&512u32.to_be_bytes());
        t.write_all(&req).unwrap();
        let mut rep_hdr = [0u8; 16];
        t.read_exact(&mut rep_hdr).unwrap();
        assert_eq!(u32::from_be_bytes(rep_hdr[0..4].try_into().unwrap()), proto::SIMPLE_REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(rep_hdr[4..8].try_into().unwrap()), 0);
        let mut data = vec![0u8; 512];
        t.read_exact(&mut data).unwrap();
        assert_eq!(data, random_bytes(MIB as usize, 3)[4096..4608]);
        // BLOCK_STATUS without a meta context negotiated over TLS: EINVAL.
        req[6..8].copy_from_slice(&proto::cmd::BLOCK_STATUS.to_be_bytes());
        t.write_all(&req).unwrap();
        t.read_exact(&mut rep_hdr).unwrap();
        assert_eq!(u32::from_be_bytes(rep_hdr[0..4].try_into().unwrap()), proto::SIMPLE_REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(rep_hdr[4..8].try_into().unwrap()), proto::err::EINVAL);
        // Garbage records once TLS is up: the server closes the connection.
        drop(t);
        c.send(&random_bytes(64 * 1024, 99));
        assert!(c.closed_by_server());
        // Bytes sent right behind STARTTLS, before the handshake, close the connection
        // (they would otherwise be taken as sent over TLS).
        let mut c = Client::connect(srv.addr());
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE);
        let mut m = Vec::new();
        for o in [opt::STARTTLS, opt::STRUCTURED_REPLY] {
            m.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            m.extend_from_slice(&o.to_be_bytes());
            m.extend_from_slice(&0u32.to_be_bytes());
        }
        c.send(&m);
        assert_eq!(c.opt_reply().kind, rep::ACK);
        assert!(c.closed_by_server());
        drop(srv);
        std::fs::remove_file(export).unwrap();
    }

    fn stalled_and_garbage_handshakes_are_cut_and_leave_the_server_flat(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let pki = Pki::new(&format!("garbage-{backend}"));
        let export = scratch("tls-garbage", backend);
        std::fs::File::create(&export).unwrap().set_len(MIB).unwrap();
        let psk = pki.psk.to_str().unwrap();
        let srv = Logged::start(
            backend,
            &export,
            &["--tls", "require", "--tls-psk", psk, "--handshake-limit", "1"],
        );
        let addr = srv.addr();
        // Silent after STARTTLS, and stalled halfway through a ClientHello: cut at the
        // handshake limit (1 s), not before and not never.
        let hello = client_hello();
        for sent in [&[][..], &hello[..hello.len() / 2]] {
            let mut c = starttls(addr);
            c.send(sent);
            let t0 = Instant::now();
            assert!(c.closed_by_server());
            let took = t0.elapsed();
            assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(10), "{took:?}");
        }
        // 10,000 handshakes that go wrong: prefixes of a real ClientHello, the same with a
        // byte flipped, or random records; from 4 threads, while a good client is served.
        let pid = srv.srv.child.id();
        let round = |n: usize, seed: u64| {
            let threads: Vec<_> = (0..4u64)
                .map(|t| {
                    let hello = hello.clone();
                    std::thread::spawn(move || {
                        let mut x = seed.wrapping_mul(31).wrapping_add(t) | 1;
                        let mut next = move || {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x
                        };
                        for _ in 0..n / 4 {
                            let mut c = starttls(addr);
                            let cut = (next() as usize % hello.len()).max(1);
                            let mut b = hello[..cut].to_vec();
                            match next() % 3 {
                                0 => {}
                                1 => {
                                    let i = next() as usize % b.len();
                                    b[i] ^= 1 << (next() % 8);
                                }
                                _ => b = random_bytes(cut, next()),
                            }
                            let _ = c.s.write_all(&b);
                            // Half wait for the server's verdict, half leave at once.
                            if next() % 2 == 0 {
                                let _ = c.s.shutdown(std::net::Shutdown::Write);
                                let mut sink = [0u8; 4096];
                                while matches!(c.s.read(&mut sink), Ok(n) if n > 0) {}
                            }
                        }
                    })
                })
                .collect();
            threads
        };
        for t in round(2000, 1) {
            t.join().unwrap();
        }
        let warm = rss_kb(pid);
        let bad = round(8000, 2);
        // Served meanwhile.
        let alice = srv.nbds(Some("alice"), "127.0.0.1", &format!("tls-psk-file={psk}"));
        for _ in 0..3 {
            assert!(run("nbdinfo", &[&alice]).contains("with TLS"));
        }
        for t in bad {
            t.join().unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        let after = rss_kb(pid);
        assert!(after < warm + 4096, "RSS grew from {warm} kB to {after} kB");
        assert!(run("nbdinfo", &[&alice]).contains("with TLS"));
        srv.expect_log("TLS handshake");
        eprintln!("RSS after 2,000 bad handshakes {warm} kB, after 10,000 {after} kB");
        drop(srv);
        std::fs::remove_file(export).unwrap();
    }
}
