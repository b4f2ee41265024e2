//! The `nbd-server` binary against QEMU's own NBD client (`qemu-img`, `qemu-io`), on both
//! backends. QEMU's tools must be installed (Debian/Ubuntu: `apt-get install qemu-utils`;
//! `.ci/run` does it): without them these tests fail, they are not skipped. (The reactor
//! each test gets from `backend_tests!` only names the backend the binary is told to use.)

mod common;

use std::process::Command;

use common::served::*;
use tests::backend_tests;

backend_tests! {
    fn qemu_img_info_and_convert_round_trip(r: &Reactor) {
        let backend = &*r.backend().to_string();
        // Sockets by completion (the default) and by readiness (the same on epoll).
        for mode in ["completion", "readiness"] {
            convert_round_trip(backend, mode);
        }
    }

    fn qemu_io_write_read_flush_zero_discard(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let export = scratch("qemu-io", backend);
        std::fs::write(&export, vec![0x11u8; 8 << 20]).unwrap();
        let srv = serve(backend, &export, &[]);
        let out = qemu("qemu-io", &["-f", "raw",
            "-c", "write -P 0xab 0 1M",
            "-c", "read -P 0xab 0 1M",
            "-c", "flush",
            "-c", "write -f -P 0xcd 1M 64k",
            "-c", "write -z 2M 1M",
            "-c", "read -P 0 2M 1M",
            "-c", "discard 4M 1M",
            "-c", "aio_write -P 0x22 5M 4k",
            "-c", "aio_write -P 0x33 6M 4k",
            "-c", "aio_flush",
            &srv.url]);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert!(out.contains("read 1048576/1048576 bytes at offset 0"), "{out}");
        drop(srv);
        let f = std::fs::read(&export).unwrap();
        assert!(f[..1 << 20].iter().all(|&b| b == 0xab));
        assert!(f[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0xcd));
        assert!(f[2 << 20..3 << 20].iter().all(|&b| b == 0));
        assert!(f[5 << 20..(5 << 20) + 4096].iter().all(|&b| b == 0x22));
        assert!(f[6 << 20..(6 << 20) + 4096].iter().all(|&b| b == 0x33));
        assert!(f[7 << 20..].iter().all(|&b| b == 0x11), "untouched bytes stay");
        std::fs::remove_file(export).unwrap();
    }

    fn unix_socket_and_read_only(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let export = scratch("unix", backend);
        std::fs::write(&export, vec![0x5au8; 1 << 20]).unwrap();
        let sock = scratch("unix-sock", backend).with_extension("sock");
        let _ = std::fs::remove_file(&sock);
        let srv = serve(backend, &export, &["--read-only", "--socket", sock.to_str().unwrap()]);
        let unix = srv.unix_url.clone().unwrap();
        let info = qemu("qemu-img", &["info", "--output=json", &unix]);
        assert!(info.contains("\"virtual-size\": 1048576"), "{info}");
        qemu("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0x5a 0 1M", &unix]);
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 1 0 4k", &srv.url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        // QEMU sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
        assert!(!out.status.success() && text.contains("Permission denied"), "{text}");
        assert!(std::fs::read(&export).unwrap().iter().all(|&b| b == 0x5a));
        drop(srv);
        // (SIGKILLed: the server could not remove its socket.)
        std::fs::remove_file(&sock).unwrap();
        std::fs::remove_file(export).unwrap();
    }

    fn acknowledged_writes_survive_sigkill_and_sigterm_exits_cleanly(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let export = scratch("sigkill", backend);
        std::fs::write(&export, vec![0u8; 4 << 20]).unwrap();
        let mut srv = serve(backend, &export, &[]);
        qemu("qemu-io", &["-f", "raw", "-c", "write -P 0x77 0 2M", "-c", "write -P 0x78 3M 4k", &srv.url]);
        // qemu-io saw the acknowledgements: the bytes must be in the file even if the server
        // dies at once.
        srv.child.kill().unwrap();
        srv.child.wait().unwrap();
        let f = std::fs::read(&export).unwrap();
        assert!(f[..2 << 20].iter().all(|&b| b == 0x77));
        assert!(f[3 << 20..(3 << 20) + 4096].iter().all(|&b| b == 0x78));
        // SIGTERM: a clean exit with status 0, socket removed.
        let sock = scratch("sigterm-sock", backend).with_extension("sock");
        let _ = std::fs::remove_file(&sock);
        let mut srv = serve(backend, &export, &["--socket", sock.to_str().unwrap()]);
        qemu("qemu-img", &["info", &srv.url]);
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(srv.child.id() as i32, libc::SIGTERM) }, 0);
        let status = srv.child.wait().unwrap();
        assert!(status.success(), "{status}");
        assert!(!sock.exists(), "the socket is removed on SIGTERM");
        std::fs::remove_file(export).unwrap();
    }
}

#[test]
fn bad_command_lines_exit_with_2() {
    for args in [&["--iothreads", "0", "x"][..], &["--nope", "x"], &[]] {
        let out = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: "), "{err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("nbd-server 0."));
    let out = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
        .arg("/nonexistent/x.img")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.img"));
}

/// `qemu-img info` and a `convert` to the export and back, with sockets doing I/O by `mode`.
fn convert_round_trip(backend: &str, mode: &str) {
    let export = scratch(&format!("convert-export-{mode}"), backend);
    let src = scratch(&format!("convert-src-{mode}"), backend);
    let back = scratch(&format!("convert-back-{mode}"), backend);
    std::fs::write(&export, vec![0u8; 16 << 20]).unwrap();
    // Random data with a zero run in the middle (qemu-img sends it as WRITE_ZEROES).
    let mut data = random_bytes(16 << 20, 7);
    data[4 << 20..6 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    let srv = serve(backend, &export, &["--socket-io", mode]);
    let info = qemu("qemu-img", &["info", "--output=json", &srv.url]);
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    assert!(info.contains("\"format\": \"raw\""), "{info}");
    qemu(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &srv.url,
        ],
    );
    qemu(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &srv.url,
            back.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the export read back differs from what was written"
    );
    assert!(
        std::fs::read(&export).unwrap() == data,
        "the exported file differs"
    );
    drop(srv);
    for p in [export, src, back] {
        std::fs::remove_file(p).unwrap();
    }
}
