//! Buffered writes that the file system cannot make without blocking (ext4, tmpfs) run on the
//! loop thread while they are small, cover whole pages and are fast, on both backends, and
//! never before an earlier write still on the pool; a write that waited sends the file's
//! writes to the thread pool until 64 in a row there were fast; the owner can turn it off
//! (`File::set_inline_writes`).
//!
//! These tests need such a file system: the target directory's if it is one (ext4 here),
//! otherwise `/dev/shm` (tmpfs). On a machine with neither they fail, they do not skip.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
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

/// Writes a page at `at` until one runs on the loop thread without a stall (the guard is on
/// then); fails after 10,000. A loaded machine can make any write slow (a preemption counts),
/// which turns inline writes off for 64 writes.
fn until_inline(r: &Reactor, f: &File, at: u64) {
    for _ in 0..10_000 {
        let stalls = r.stats().inline_write_stalls;
        if write_pages(r, f, at, 1, 0) == 1 && r.stats().inline_write_stalls == stalls {
            return;
        }
    }
    panic!("no write ran inline in 10,000");
}

backend_tests! {
    fn small_buffered_writes_run_on_the_loop_thread(r: &Reactor) {
        let (r, pool) = with_own_pool(r);
        let path = scratch("small", &r);
        let f = File::from_std(std::fs::File::create(&path).unwrap());
        assert!(f.inline_writes(), "on by default");
        let inline = write_pages(&r, &f, 0, 100, 0xa1);
        let (res, _) = r.block_on(f.writev_at(vec![vec![0xb2; 100], vec![0xc3; 3996]], 4096));
        assert_eq!(res.unwrap(), 4096);
        if r.stats().inline_write_stalls == 0 {
            assert_eq!(inline, 100, "every write inline");
            assert_eq!(r.stats().inline_io, 101, "writev too");
            assert_eq!(pool.threads(), 0, "no write went to the pool");
        } else {
            // A write was slow (a loaded machine, valgrind): the next 64 went to the pool.
            assert!(inline >= 1, "the first write ran inline");
        }
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 100 * 4096);
        assert!(back[..4096].iter().all(|&b| b == 0xa1));
        assert!(back[4096..4196].iter().all(|&b| b == 0xb2));
        assert!(back[4196..8192].iter().all(|&b| b == 0xc3));
        assert!(back[8192..].iter().all(|&b| b == 0xa1));
        std::fs::remove_file(&path).unwrap();
    }

    fn parts_of_pages_large_writes_and_sync_files_go_to_the_pool(r: &Reactor) {
        let path = scratch("pool", r);
        let f = File::from_std(std::fs::File::create(&path).unwrap());
        until_inline(r, &f, 0);
        let before = r.stats().inline_io;
        r.block_on(async {
            // Part of a page (which the kernel might have to read first), a page at an offset
            // inside a page, and over 256 KiB.
            for (len, at) in [(512, 512), (4096, 100), ((256 << 10) + 4096, 8192)] {
                let (res, _) = f.write_at(vec![5u8; len], at).await;
                assert_eq!(res.unwrap(), len);
            }
        });
        assert_eq!(r.stats().inline_io, before, "none of them inline");
        // Exactly 256 KiB of whole pages is inline (with the guard on).
        until_inline(r, &f, 0);
        let before = r.stats().inline_io;
        let (res, _) = r.block_on(f.write_at(vec![6u8; 256 << 10], 1 << 20));
        assert_eq!(res.unwrap(), 256 << 10);
        assert_eq!(r.stats().inline_io, before + 1, "256 KiB runs inline");
        // A file opened O_DSYNC: every write waits for the device, so none inline.
        let sync = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DSYNC)
            .open(&path)
            .unwrap();
        let sync = File::from_std(sync);
        assert_eq!(write_pages(r, &sync, 0, 3, 7), 0, "O_DSYNC writes go to the pool");
        let back = std::fs::read(&path).unwrap();
        assert!(back[..3 * 4096].iter().all(|&b| b == 7));
        assert!(back[8192 + 4096..(256 << 10) + 8192].iter().all(|&b| b == 5));
        assert!(back[1 << 20..(1 << 20) + (256 << 10)].iter().all(|&b| b == 6));
        std::fs::remove_file(&path).unwrap();
    }

    fn turned_off_they_go_to_the_pool(r: &Reactor) {
        let (r, pool) = with_own_pool(r);
        let path = scratch("off", &r);
        let f = File::from_std(std::fs::File::create(&path).unwrap());
        let clone = f.clone();
        clone.set_inline_writes(false);
        assert!(!f.inline_writes(), "the setting is the file's, shared by its clones");
        assert_eq!(write_pages(&r, &f, 0, 10, 1), 0, "none inline when turned off");
        assert!(pool.threads() >= 1);
        f.set_inline_writes(true);
        until_inline(&r, &f, 0);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 10 * 4096);
        assert!(back[4096..].iter().all(|&b| b == 1));
        std::fs::remove_file(&path).unwrap();
    }

    fn an_inline_write_never_overtakes_an_earlier_one_on_the_pool(r: &Reactor) {
        let path = scratch("order", r);
        let f = std::rc::Rc::new(File::from_std(std::fs::File::create(&path).unwrap()));
        for round in 0..20u8 {
            until_inline(r, &f, 2 << 20);
            // A 1 MiB write goes to the pool; a page written over its start right after it,
            // both in flight together, must not run inline before it.
            let (big, small) = (f.clone(), f.clone());
            let a = r.spawn_local(async move { big.write_at(vec![round; 1 << 20], 0).await.0 });
            let b = r.spawn_local(async move { small.write_at(vec![0xee; 4096], 0).await.0 });
            r.block_on(async {
                assert_eq!(a.await.unwrap().unwrap(), 1 << 20);
                assert_eq!(b.await.unwrap().unwrap(), 4096);
            });
            let back = std::fs::read(&path).unwrap();
            assert!(back[..4096].iter().all(|&x| x == 0xee), "round {round}: the later write was overtaken");
            assert!(back[4096..1 << 20].iter().all(|&x| x == round));
        }
        std::fs::remove_file(&path).unwrap();
    }

    fn a_write_that_waited_sends_the_files_writes_to_the_pool_until_they_are_fast(r: &Reactor) {
        let path = scratch("stall", r);
        let f = File::from_std(std::fs::File::create(&path).unwrap());
        // Another thread's 128 MiB write holds the file's lock for its whole copy, tens of
        // milliseconds: an inline write made meanwhile waits for it. (Tried up to 5 times:
        // the other thread may not be inside its write yet when ours runs.)
        let mut stalled = false;
        for _ in 0..5 {
            until_inline(r, &f, 0);
            let big = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let (started, wait) = mpsc::channel();
            let writer = std::thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                let data = vec![9u8; 128 << 20];
                started.send(()).unwrap();
                big.write_all_at(&data, 1 << 20).unwrap();
            });
            wait.recv().unwrap();
            std::thread::sleep(Duration::from_millis(5));
            let stalls = r.stats().inline_write_stalls;
            assert_eq!(write_pages(r, &f, 0, 1, 2), 1, "the write that waits is made inline");
            writer.join().unwrap();
            if r.stats().inline_write_stalls > stalls {
                stalled = true;
                break;
            }
        }
        assert!(stalled, "a 4 KiB write made during a 128 MiB one never stalled");
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
