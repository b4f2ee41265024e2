//! `--cache none` (`O_DIRECT`) exports on both backends, on a file on the machine's disk
//! (the target directory, not tmpfs): the alignment advertised; random aligned and unaligned
//! writes, pipelined and overlapping, land in order (the file and `qemu-img compare` against
//! a model); FUA writes acknowledged before a `SIGKILL` are in the file; libnbd's tools and
//! strict client; a size the alignment does not divide is refused at start.

mod common;

use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};

use common::served::{Rng, random_bytes, run, scratch, serve};
use common::{Client, cflag, cmd, info, opt, proto, rep};
use tests::backend_tests;

const MIB: u64 = 1 << 20;
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/libnbd_check.py");
const CHECKS: usize = 11;

fn addr_of(url: &str) -> std::net::SocketAddr {
    url.strip_prefix("nbd://")
        .and_then(|a| a.strip_suffix("/disk"))
        .unwrap()
        .parse()
        .unwrap()
}

backend_tests! {
    fn block_size_is_advertised_and_odd_sizes_refused(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let export = scratch("direct-info", backend);
        std::fs::File::create(&export).unwrap().set_len(4 * MIB).unwrap();
        let srv = serve(backend, &export, &["--cache", "none"]);
        let mut c = Client::connect(addr_of(&srv.url));
        c.handshake(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        let v = c.info_or_go(opt::INFO, "disk", &[info::BLOCK_SIZE]);
        let bs = &v.iter().find(|r| r.data[..2] == info::BLOCK_SIZE.to_be_bytes()).unwrap().data;
        let min = u32::from_be_bytes(bs[2..6].try_into().unwrap());
        let preferred = u32::from_be_bytes(bs[6..10].try_into().unwrap());
        assert!(min >= 512 && min.is_power_of_two(), "minimum {min}");
        assert!(preferred >= min && preferred >= 4096, "preferred {preferred}");
        drop(srv);
        // A size O_DIRECT cannot reach the end of: refused with the reason.
        std::fs::File::create(&export).unwrap().set_len(4 * MIB + 100).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
            .args(["--backend", backend, "--bind", "127.0.0.1:0", "--cache", "none"])
            .arg(&export)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--cache none needs a size that is a multiple of"), "{err}");
        std::fs::remove_file(export).unwrap();
    }

    fn random_writes_pipelined_and_overlapping_land_in_order(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let export = scratch("direct-random", backend);
        let size = 8 * MIB as usize;
        let mut model = random_bytes(size, 5);
        std::fs::write(&export, &model).unwrap();
        let srv = serve(backend, &export, &["--cache", "none"]);
        let addr = addr_of(&srv.url);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Rounds of 64 writes sent back to back before any reply is read: aligned and not,
        // many overlapping the same few blocks, some with FUA; then zeroes and trims.
        let mut c = Client::connect(addr);
        c.go("disk");
        let mut handle = 0u64;
        for round in 0..20 {
            let mut sent = 0;
            for _ in 0..64 {
                // Every other round all hot: small writes, odd offsets, within 8 KiB, so that
                // their read-modify-writes of the same blocks run at the same time.
                let hot = round % 2 == 0 || rng.next() % 4 == 0;
                let (off, len) = if hot {
                    (rng.next() % 7000, 1 + rng.next() % 1200)
                } else if rng.next() % 2 == 0 {
                    let blocks = size as u64 / 4096;
                    ((rng.next() % (blocks - 64)) * 4096, 4096 * (1 + rng.next() % 32))
                } else {
                    (rng.next() % (size as u64 - 300_000), 1 + rng.next() % 200_000)
                };
                let data = random_bytes(len as usize, rng.next());
                let flags = if rng.next() % 8 == 0 { cflag::FUA } else { 0 };
                let mut m = Vec::new();
                m.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
                m.extend_from_slice(&flags.to_be_bytes());
                m.extend_from_slice(&cmd::WRITE.to_be_bytes());
                m.extend_from_slice(&handle.to_be_bytes());
                m.extend_from_slice(&off.to_be_bytes());
                m.extend_from_slice(&(len as u32).to_be_bytes());
                m.extend_from_slice(&data);
                c.send(&m);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                handle += 1;
                sent += 1;
            }
            if round % 5 == 4 {
                // Zeroes and a trim, unaligned, behind the writes.
                for kind in [cmd::WRITE_ZEROES, cmd::TRIM] {
                    let (off, len) = (rng.next() % (size as u64 - 100_000), 1 + rng.next() % 90_000);
                    c.request(0, kind, handle, off, len as u32);
                    model[off as usize..(off + len) as usize].fill(0);
                    handle += 1;
                    sent += 1;
                }
            }
            for _ in 0..sent {
                let (error, _) = c.reply();
                assert_eq!(error, 0);
            }
        }
        // What the export reads back, unaligned, is the model.
        for _ in 0..50 {
            let off = rng.next() % (size as u64 - 70_000);
            let len = 1 + (rng.next() % 65_536) as u32;
            let (error, got) = c.read(handle, off, len);
            handle += 1;
            assert_eq!(error, 0);
            assert!(got == model[off as usize..off as usize + len as usize], "read at {off}+{len}");
        }
        let reference = scratch("direct-model", backend);
        std::fs::write(&reference, &model).unwrap();
        run("qemu-img", &["compare", "-f", "raw", "-F", "raw", reference.to_str().unwrap(), &srv.url]);
        drop(c);
        drop(srv);
        assert!(std::fs::read(&export).unwrap() == model, "the file is the model");
        std::fs::remove_file(export).unwrap();
        std::fs::remove_file(reference).unwrap();
    }

    fn fua_writes_acknowledged_before_sigkill_are_in_the_file(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let export = scratch("direct-fua", backend);
        std::fs::File::create(&export).unwrap().set_len(4 * MIB).unwrap();
        let mut srv = serve(backend, &export, &["--cache", "none"]);
        let mut c = Client::connect(addr_of(&srv.url));
        c.go("disk");
        let mut written = Vec::new();
        for i in 0..32u64 {
            let (off, data) = (i * 100_003 % (3 * MIB), random_bytes(777 + i as usize * 13, i));
            assert_eq!(c.write(cflag::FUA, i, off, &data), 0);
            written.push((off, data));
        }
        srv.child.kill().unwrap();
        srv.child.wait().unwrap();
        let f = std::fs::File::open(&export).unwrap();
        for (off, data) in written.iter().rev().take(1) {
            let mut got = vec![0u8; data.len()];
            f.read_exact_at(&mut got, *off).unwrap();
            assert!(&got == data, "the last FUA write at {off}");
        }
        // Earlier writes may be overlapped by later ones: replay them into a model.
        let mut model = vec![0u8; 4 * MIB as usize];
        for (off, data) in &written {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        assert!(std::fs::read(&export).unwrap() == model);
        std::fs::remove_file(export).unwrap();
    }

    fn libnbd_tools_and_strict_client(r: &Reactor) {
        let backend = &*r.backend().to_string();
        // The script's layout: 64 MiB whose only data is [4 MiB, 6 MiB).
        let export = scratch("direct-libnbd", backend);
        let f = std::fs::File::create(&export).unwrap();
        f.set_len(64 * MIB).unwrap();
        f.write_all_at(&random_bytes(2 * MIB as usize, 7), 4 * MIB).unwrap();
        drop(f);
        let srv = serve(backend, &export, &["--cache", "none"]);
        let info = run("nbdinfo", &[&srv.url]);
        assert!(info.contains("block_size_minimum: 512") || info.contains("block_size_minimum: 4096"), "{info}");
        let out = run("/usr/bin/python3", &[SCRIPT, &srv.url, export.to_str().unwrap()]);
        let passed = out.lines().filter(|l| l.starts_with("ok ")).count();
        assert_eq!(passed, CHECKS, "{out}");
        let src = scratch("direct-src", backend);
        let back = scratch("direct-back", backend);
        std::fs::write(&src, random_bytes(16 * MIB as usize, 9)).unwrap();
        run("nbdcopy", &[src.to_str().unwrap(), &srv.url]);
        run("nbdcopy", &[&srv.url, back.to_str().unwrap()]);
        let got = std::fs::read(&back).unwrap();
        assert!(got[..16 * MIB as usize] == std::fs::read(&src).unwrap()[..]);
        assert!(got == std::fs::read(&export).unwrap());
        drop(srv);
        for p in [export, src, back] {
            std::fs::remove_file(p).unwrap();
        }
        let _ = rep::ACK;
    }
}
