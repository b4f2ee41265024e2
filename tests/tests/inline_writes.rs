//! Buffered writes that the file system cannot make without blocking (ext4, tmpfs) run on the
//! loop thread while they are small and fast, on both backends; a write that waited sends the
//! file's writes to the thread pool until 64 in a row there were fast; the owner can turn it
//! off (`File::set_inline_writes`).
//!
//! These tests need such a file system: the target directory's if it is one (ext4 here),
//! otherwise `/dev/shm` (tmpfs). On a machine with neither they fail, they do not skip.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use reactor::fs::File;
use reactor::{Reactor, ThreadPool};
use tests::backend_tests;

/// Whether `dir`'s file system refuses `RWF_NOWAIT` buffered writes (so they would block).
fn refuses_nowait_writes(dir: &std::path::Path) -> bool {
    let path = dir.join(format!("inline-probe-{}", std::process::id()));
    let Ok(f) = std::fs::File::create(&path) else {
        return false;
    };
    let byte = [0u8; 1];
    let iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: one iovec over a live 1-byte array, on an open fd.
    let rc = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
    let err = std::io::Error::last_os_error().raw_os_error();
    let _ = std::fs::remove_file(&path);
    rc < 0 && err == Some(libc::EOPNOTSUPP)
}

/// A fresh path on a file system whose buffered writes block.
fn scratch(name: &str, r: &Reactor) -> PathBuf {
    let dir = [PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from("/dev/shm")]
        .into_iter()
        .find(|d| refuses_nowait_writes(d))
        .expect("neither the target directory nor /dev/shm is on a file system without non-blocking buffered writes (ext4, tmpfs)");
    dir.join(format!("iw-{name}-{}-{}", r.backend(), std::process::id()))
}

/// A reactor of `r`'s backend with a pool of its own, to count the pool's threads.
fn with_own_pool(r: &Reactor) -> (Reactor, ThreadPool) {
    let pool = ThreadPool::new(0, 4, Duration::from_secs(30));
    let r = Reactor::builder()
        .backend(r.backend())
        .thread_pool(pool.clone())
        .build()
        .unwrap();
    (r, pool)
}

/// Writes `n` pages of `byte` at `at`, `at + 4096`, ..., one after another; returns how many
/// ran on the loop thread.
fn write_pages(r: &Reactor, f: &File, at: u64, n: u64, byte: u8) -> u64 {
    let before = r.stats().inline_io;
    r.block_on(async {
        for i in 0..n {
            let (res, _) = f.write_at(vec![byte; 4096], at + i * 4096).await;
            assert_eq!(res.unwrap(), 4096);
        }
    });
    r.stats().inline_io - before
}

backend_tests! {
    fn small_buffered_writes_run_on_the_loop_thread(r: &Reactor) {
        let (r, pool) = with_own_pool(r);
        let path = scratch("small", &r);
        let f = File::from_std(std::fs::File::create(&path).unwrap());
        assert!(f.inline_writes(), "on by default");
        assert_eq!(write_pages(&r, &f, 0, 100, 0xa1), 100, "every write inline");
        let (res, _) = r.block_on(f.writev_at(vec![vec![0xb2; 100], vec![0xc3; 3996]], 4096));
        assert_eq!(res.unwrap(), 4096);
        assert_eq!(r.stats().inline_io, 101, "writev too");
        assert_eq!(pool.threads(), 0, "no write went to the pool");
        assert_eq!(r.stats().inline_write_stalls, 0);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 100 * 4096);
        assert!(back[..4096].iter().all(|&b| b == 0xa1));
        assert!(back[4096..4196].iter().all(|&b| b == 0xb2));
        assert!(back[4196..8192].iter().all(|&b| b == 0xc3));
        assert!(back[8192..].iter().all(|&b| b == 0xa1));
        std::fs::remove_file(&path).unwrap();
    }

    fn turned_off_or_large_they_go_to_the_pool(r: &Reactor) {
        let (r, pool) = with_own_pool(r);
        let path = scratch("off", &r);
        let f = File::from_std(std::fs::File::create(&path).unwrap());
        let clone = f.clone();
        clone.set_inline_writes(false);
        assert!(!f.inline_writes(), "the setting is the file's, shared by its clones");
        assert_eq!(write_pages(&r, &f, 0, 10, 1), 0, "none inline when turned off");
        assert!(pool.threads() >= 1);
        f.set_inline_writes(true);
        assert_eq!(write_pages(&r, &f, 0, 10, 2), 10, "inline again when turned on");
        // Over 256 KiB, the copy outweighs the hand-over.
        let before = r.stats().inline_io;
        let (res, _) = r.block_on(f.write_at(vec![3u8; (256 << 10) + 4096], 0));
        assert_eq!(res.unwrap(), (256 << 10) + 4096);
        assert_eq!(r.stats().inline_io, before, "a large write goes to the pool");
        let (res, _) = r.block_on(f.write_at(vec![4u8; 256 << 10], 0));
        assert_eq!(res.unwrap(), 256 << 10);
        assert_eq!(r.stats().inline_io, before + 1, "256 KiB runs inline");
        let back = std::fs::read(&path).unwrap();
        assert!(back[..256 << 10].iter().all(|&b| b == 4));
        assert!(back[256 << 10..].iter().all(|&b| b == 3));
        std::fs::remove_file(&path).unwrap();
    }

    fn a_write_that_waited_sends_the_files_writes_to_the_pool_until_they_are_fast(r: &Reactor) {
        let path = scratch("stall", r);
        let f = File::from_std(std::fs::File::create(&path).unwrap());
        assert_eq!(write_pages(r, &f, 0, 1, 1), 1);
        // Another thread's 128 MiB write holds the file's lock for its whole copy, tens of
        // milliseconds: the next inline write waits for it.
        let big = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let (started, wait) = mpsc::channel();
        let writer = std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let data = vec![9u8; 128 << 20];
            started.send(()).unwrap();
            big.write_all_at(&data, 1 << 20).unwrap();
        });
        wait.recv().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let stalls = r.stats().inline_write_stalls;
        assert_eq!(write_pages(r, &f, 0, 1, 2), 1, "the write that waits is made inline");
        writer.join().unwrap();
        assert!(
            r.stats().inline_write_stalls > stalls,
            "a 4 KiB write that waited for a 128 MiB one is a stall"
        );
        // From now on the pool, until 64 writes in a row there were fast (more if this
        // machine makes one of them slow: the streak then starts over).
        let mut on_the_pool = 0;
        while write_pages(r, &f, 4096, 1, 3) == 0 {
            on_the_pool += 1;
            assert!(on_the_pool < 100_000, "inline writes never came back");
        }
        assert!(on_the_pool >= 64, "inline again after {on_the_pool} writes on the pool");
        let back = std::fs::read(&path).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 2));
        assert!(back[4096..8192].iter().all(|&b| b == 3));
        assert!(back[1 << 20..].iter().all(|&b| b == 9));
        std::fs::remove_file(&path).unwrap();
    }
}
