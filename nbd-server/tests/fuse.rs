//! FUSE exports on a real kernel FUSE mount, on both backends and every transport each runs
//! (io_uring and classic on the uring backend, classic on epoll): data written through the
//! mount (buffered and `O_DIRECT`) read back and found in the image; NBD and FUSE seeing each
//! other's writes; `fsync` then `SIGKILL` losing nothing; holes seen by `SEEK_HOLE` and kept
//! by `cp --sparse=always`; `fallocate` reaching the image; a read-only export; readers killed
//! mid-read; `SIGTERM` with requests in flight; a busy mountpoint; `qemu-img` and
//! `fio --verify` on the mounted file.
//!
//! Root and `/dev/fuse` are required, and on the uring backend FUSE over io_uring
//! (`.ci/run` turns it on): a machine without them fails these tests, never skips them.

mod common;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::process::Command;
use std::time::Duration;

use common::mounted::{is_mounted, mount, scratch, transports};
use common::served::{Rng, random_bytes, run};
use tests::backend_tests;

const MIB: usize = 1 << 20;

/// An image of `size` random bytes (seeded), and its contents.
fn image(tag: &str, size: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let p = scratch(tag);
    let data = random_bytes(size, seed);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

/// A 4096-aligned buffer of `n` bytes (for `O_DIRECT`).
struct Aligned(*mut u8, usize);

impl Aligned {
    fn new(data: &[u8]) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(data.len(), 4096).unwrap();
        // SAFETY: a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        assert!(!p.is_null());
        // SAFETY: `p` has room for `data.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Aligned(p, data.len())
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `self.1` initialised bytes at `self.0`.
        unsafe { std::slice::from_raw_parts(self.0, self.1) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe {
            std::alloc::dealloc(
                self.0,
                std::alloc::Layout::from_size_align(self.1, 4096).unwrap(),
            )
        }
    }
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

backend_tests! {
    fn random_writes_through_the_mount_read_back_buffered_and_direct(r: &Reactor) {
        let backend = &*r.backend().to_string();
        for t in transports(backend) {
            let (img, mut model) = image(&format!("rw-{backend}-{t}"), 16 * MIB, 7);
            let m = mount(backend, t, &img, false, &[]);
            let f = OpenOptions::new().read(true).write(true).open(&m.mnt).unwrap();
            assert_eq!(f.metadata().unwrap().len(), model.len() as u64);
            let mut rng = Rng(0x1234_5678);
            for i in 0..200 {
                let len = 1 + rng.below(64 * 1024) as usize;
                let at = rng.below((model.len() - len) as u64) as usize;
                let data = random_bytes(len, i);
                f.write_all_at(&data, at as u64).unwrap();
                model[at..at + len].copy_from_slice(&data);
            }
            let d = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&m.mnt).unwrap();
            for i in 0..100 {
                let len = 4096 * (1 + rng.below(16) as usize);
                let at = 4096 * rng.below(((model.len() - len) / 4096) as u64) as usize;
                let data = Aligned::new(&random_bytes(len, 1000 + i));
                d.write_all_at(data.as_slice(), at as u64).unwrap();
                model[at..at + len].copy_from_slice(data.as_slice());
            }
            // Unaligned reads, and a read across the end (short).
            let mut buf = vec![0u8; 10_000];
            f.read_exact_at(&mut buf, 12_345).unwrap();
            assert_eq!(buf, model[12_345..22_345]);
            let n = f.read_at(&mut buf, (model.len() - 100) as u64).unwrap();
            assert_eq!(n, 100);
            assert_eq!(std::fs::read(&m.mnt).unwrap(), model, "through the mount ({t})");
            assert_eq!(std::fs::read(&img).unwrap(), model, "in the image ({t})");
            // Past the end: the size is fixed.
            let e = f.write_at(b"x", model.len() as u64).unwrap_err();
            assert_eq!(errno_of(&e), libc::ENOSPC, "{e}");
            let e = f.set_len(1).unwrap_err();
            assert_eq!(errno_of(&e), libc::EPERM, "{e}");
            drop((f, d));
            run("qemu-img", &["compare", "-f", "raw", "-F", "raw", img.to_str().unwrap(), m.mnt.to_str().unwrap()]);
            let info = run("qemu-img", &["info", "-f", "raw", m.mnt.to_str().unwrap()]);
            assert!(info.contains("16 MiB"), "{info}");
            drop(m);
            std::fs::remove_file(&img).unwrap();
        }
    }

    fn writes_through_nbd_are_read_through_the_mount_and_back(r: &Reactor) {
        let backend = &*r.backend().to_string();
        for t in transports(backend) {
            let (img, mut model) = image(&format!("nbd-{backend}-{t}"), 4 * MIB, 9);
            let m = mount(backend, t, &img, true, &[]);
            let url = m.url.clone().unwrap();
            // NBD → FUSE.
            run("qemu-io", &["-f", "raw", "-c", "write -P 0xab 65536 131072", &url]);
            model[65536..65536 + 131072].fill(0xab);
            assert_eq!(std::fs::read(&m.mnt).unwrap(), model, "NBD's write through the mount");
            // FUSE → NBD.
            let f = OpenOptions::new().write(true).open(&m.mnt).unwrap();
            f.write_all_at(&[0xcd; 8192], MIB as u64).unwrap();
            model[MIB..MIB + 8192].fill(0xcd);
            let copy = img.with_extension("copy");
            run("nbdcopy", &[&url, copy.to_str().unwrap()]);
            assert_eq!(std::fs::read(&copy).unwrap(), model, "the mount's write through NBD");
            drop(m);
            let _ = std::fs::remove_file(copy);
            std::fs::remove_file(&img).unwrap();
        }
    }

    fn fsync_then_sigkill_loses_nothing_acknowledged(r: &Reactor) {
        let backend = &*r.backend().to_string();
        for t in transports(backend) {
            let (img, mut model) = image(&format!("kill-{backend}-{t}"), 8 * MIB, 11);
            let mut m = mount(backend, t, &img, false, &[]);
            let f = OpenOptions::new().write(true).open(&m.mnt).unwrap();
            let mut rng = Rng(99);
            for i in 0..50 {
                let len = 1 + rng.below(100_000) as usize;
                let at = rng.below((model.len() - len) as u64) as usize;
                let data = random_bytes(len, 500 + i);
                f.write_all_at(&data, at as u64).unwrap();
                model[at..at + len].copy_from_slice(&data);
            }
            f.sync_all().unwrap();
            m.child.kill().unwrap();
            m.child.wait().unwrap();
            // The daemon is gone: the mount answers ENOTCONN until it is unmounted. (On the
            // io_uring transport, requests the kernel was handing to the dead daemon's ring
            // may end with ECANCELED or ECONNABORTED first, while it tears the ring down.)
            let mut seen = Vec::new();
            loop {
                let e = f.write_at(b"x", 0).unwrap_err();
                seen.push(errno_of(&e));
                if errno_of(&e) == libc::ENOTCONN {
                    break;
                }
                let tearing_down = matches!(errno_of(&e), libc::ECANCELED | libc::ECONNABORTED);
                assert!(tearing_down && seen.len() < 8, "{e} after {seen:?}");
            }
            drop(f);
            assert_eq!(std::fs::read(&img).unwrap(), model);
            drop(m);
            std::fs::remove_file(&img).unwrap();
        }
    }

    fn holes_are_seen_through_the_mount_and_kept_by_cp_sparse(r: &Reactor) {
        let backend = &*r.backend().to_string();
        for t in transports(backend) {
            let img = scratch(&format!("holes-{backend}-{t}"));
            let f = std::fs::File::create(&img).unwrap();
            f.set_len(8 * MIB as u64).unwrap();
            f.write_all_at(&vec![1u8; MIB], MIB as u64).unwrap();
            f.write_all_at(&vec![2u8; MIB / 2], 5 * MIB as u64).unwrap();
            f.sync_all().unwrap();
            drop(f);
            let m = mount(backend, t, &img, false, &[]);
            let g = std::fs::File::open(&m.mnt).unwrap();
            let seek = |at: usize, whence| {
                // SAFETY: lseek on an open fd.
                let r = unsafe { libc::lseek(g.as_raw_fd(), at as i64, whence) };
                if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r as usize) }
            };
            assert_eq!(seek(0, libc::SEEK_DATA).unwrap(), MIB);
            assert_eq!(seek(MIB, libc::SEEK_HOLE).unwrap(), 2 * MIB);
            assert_eq!(seek(2 * MIB, libc::SEEK_DATA).unwrap(), 5 * MIB);
            assert_eq!(seek(5 * MIB, libc::SEEK_HOLE).unwrap(), 5 * MIB + MIB / 2);
            assert_eq!(seek(6 * MIB, libc::SEEK_HOLE).unwrap(), 6 * MIB);
            assert_eq!(errno_of(&seek(6 * MIB, libc::SEEK_DATA).unwrap_err()), libc::ENXIO);
            let copy = img.with_extension("sparse-copy");
            let out = Command::new("cp").arg("--sparse=always").arg(&m.mnt).arg(&copy).status().unwrap();
            assert!(out.success());
            assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&img).unwrap());
            let allocated = std::fs::metadata(&copy).unwrap().blocks() * 512;
            assert!(allocated <= 2 * MIB as u64, "the copy keeps the holes: {allocated} bytes allocated");
            drop((g, m));
            let _ = std::fs::remove_file(copy);
            std::fs::remove_file(&img).unwrap();
        }
    }

    fn fallocate_through_the_mount_reaches_the_image(r: &Reactor) {
        let backend = &*r.backend().to_string();
        for t in transports(backend) {
            let (img, _) = image(&format!("falloc-{backend}-{t}"), 4 * MIB, 13);
            let m = mount(backend, t, &img, false, &[]);
            let f = OpenOptions::new().read(true).write(true).open(&m.mnt).unwrap();
            let fallocate = |mode, at: usize, len: usize| {
                // SAFETY: fallocate on an open fd.
                let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, at as i64, len as i64) };
                if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
            };
            let keep = libc::FALLOC_FL_KEEP_SIZE;
            fallocate(libc::FALLOC_FL_PUNCH_HOLE | keep, MIB, MIB).unwrap();
            fallocate(libc::FALLOC_FL_ZERO_RANGE | keep, 3 * MIB, 4096).unwrap();
            // Growing the file is refused: its size is the export's.
            assert_eq!(errno_of(&fallocate(0, 4 * MIB, 4096).unwrap_err()), libc::EPERM);
            let data = std::fs::read(&img).unwrap();
            assert!(data[MIB..2 * MIB].iter().all(|&b| b == 0));
            assert!(data[3 * MIB..3 * MIB + 4096].iter().all(|&b| b == 0));
            assert!(data[2 * MIB..3 * MIB].iter().any(|&b| b != 0));
            let i = std::fs::File::open(&img).unwrap();
            // SAFETY: lseek on an open fd.
            let hole = unsafe { libc::lseek(i.as_raw_fd(), MIB as i64, libc::SEEK_HOLE) };
            assert_eq!(hole, MIB as i64, "the punched range is a hole in the image");
            drop((f, m));
            std::fs::remove_file(&img).unwrap();
        }
    }

    fn a_read_only_export_refuses_writes(r: &Reactor) {
        let backend = &*r.backend().to_string();
        for t in transports(backend) {
            let (img, model) = image(&format!("ro-{backend}-{t}"), MIB, 17);
            let m = mount(backend, t, &img, false, &["--read-only"]);
            let e = OpenOptions::new().write(true).open(&m.mnt).unwrap_err();
            assert_eq!(errno_of(&e), libc::EROFS, "{e}");
            assert_eq!(std::fs::read(&m.mnt).unwrap(), model);
            assert_eq!(std::fs::metadata(&m.mnt).unwrap().mode() & 0o777, 0o444);
            drop(m);
            std::fs::remove_file(&img).unwrap();
        }
    }

    fn readers_killed_mid_read_leave_the_export_serving(r: &Reactor) {
        let backend = &*r.backend().to_string();
        for t in transports(backend) {
            let (img, model) = image(&format!("intr-{backend}-{t}"), 32 * MIB, 19);
            let m = mount(backend, t, &img, false, &[]);
            for i in 0..10 {
                let mut dd = Command::new("dd")
                    .arg(format!("if={}", m.mnt.display()))
                    .args(["of=/dev/null", "bs=4M", "iflag=direct", "status=none"])
                    .spawn()
                    .unwrap();
                std::thread::sleep(Duration::from_millis(2 + i));
                dd.kill().unwrap();
                dd.wait().unwrap();
            }
            assert_eq!(std::fs::read(&m.mnt).unwrap(), model, "still serving, data intact");
            drop(m);
            std::fs::remove_file(&img).unwrap();
        }
    }

    fn sigterm_with_requests_in_flight_unmounts_and_exits(r: &Reactor) {
        let backend = &*r.backend().to_string();
        for t in transports(backend) {
            let (img, _) = image(&format!("term-{backend}-{t}"), 16 * MIB, 23);
            let mut m = mount(backend, t, &img, false, &[]);
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let workers: Vec<_> = (0..4)
                .map(|w| {
                    let (path, stop) = (m.mnt.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let Ok(f) = OpenOptions::new().read(true).write(true).open(&path) else { return 0 };
                        let mut buf = vec![0u8; 256 * 1024];
                        let mut done = 0u64;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let at = (done * 4096 + w * MIB as u64) % (15 * MIB as u64);
                            let ok = if w % 2 == 0 { f.read_at(&mut buf, at).is_ok() } else { f.write_at(&buf[..4096], at).is_ok() };
                            if !ok {
                                break;
                            }
                            done += 1;
                        }
                        done
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(200));
            let status = m.stop();
            assert!(status.success(), "exit status {status:?}");
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let served: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
            assert!(served > 0, "the workers had requests served before the stop");
            assert!(!is_mounted(&m.mnt), "unmounted at exit");
            drop(m);
            std::fs::remove_file(&img).unwrap();
        }
    }

    fn a_second_daemon_on_a_busy_mountpoint_fails_clearly(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let t = transports(backend)[0];
        let (img, _) = image(&format!("busy-{backend}"), MIB, 29);
        let m = mount(backend, t, &img, false, &[]);
        let out = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
            .args(["--backend", backend, "--fuse"])
            .arg(&m.mnt)
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("busy") && err.contains("mounted there already"), "{err}");
        // A missing mountpoint, and a directory.
        for (where_, says) in [("/nonexistent/mnt", "no such file"), ("/tmp", "not a regular file")] {
            let out = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
                .args(["--backend", backend, "--fuse", where_])
                .arg(&img)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(says), "{err}");
        }
        assert_eq!(std::fs::read(&m.mnt).unwrap().len(), MIB, "the first export still serves");
        drop(m);
        std::fs::remove_file(&img).unwrap();
    }

    fn fio_verifies_what_it_wrote_on_the_mounted_file(r: &Reactor) {
        let backend = &*r.backend().to_string();
        for t in transports(backend) {
            let (img, _) = image(&format!("fio-{backend}-{t}"), 16 * MIB, 31);
            let m = mount(backend, t, &img, false, &[]);
            let file = format!("--filename={}", m.mnt.display());
            for engine in [["--ioengine=psync", "--iodepth=1"], ["--ioengine=io_uring", "--iodepth=16"]] {
                run("fio", &["--name=verify", &file, "--rw=randwrite", "--bs=4k", "--size=16M",
                    "--direct=1", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0", engine[0], engine[1]]);
            }
            drop(m);
            std::fs::remove_file(&img).unwrap();
        }
    }

    fn the_transport_is_chosen_as_asked_and_said(r: &Reactor) {
        let backend = &*r.backend().to_string();
        let (img, _) = image(&format!("choice-{backend}"), MIB, 37);
        if backend == "uring" {
            assert!(
                nbd_server::fuse::kernel_offers_uring(),
                "FUSE over io_uring is off on this machine: as root, \
                 echo 1 > /sys/module/fuse/parameters/enable_uring (.ci/run does)"
            );
            let m = mount(backend, "auto", &img, false, &[]);
            assert_eq!(m.transport, "uring", "auto takes io_uring where it runs");
            drop(m);
        } else {
            let m = mount(backend, "auto", &img, false, &[]);
            assert_eq!(m.transport, "classic", "auto on epoll");
            drop(m);
            let mnt = img.with_extension("mnt");
            std::fs::write(&mnt, b"").unwrap();
            let out = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
                .args(["--backend", backend, "--fuse-transport", "uring", "--fuse"])
                .arg(&mnt)
                .arg(&img)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("needs the io_uring backend"), "{err}");
            assert!(!is_mounted(&mnt));
            std::fs::remove_file(&mnt).unwrap();
        }
        std::fs::remove_file(&img).unwrap();
    }
}
