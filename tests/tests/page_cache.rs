//! Reads the page cache can serve complete on the loop thread (`RWF_NOWAIT`) on both backends,
//! instead of a ring operation or a thread-pool round trip: never short, and never on an
//! `O_DIRECT` file.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use reactor::fs::File;
use reactor::{AlignedBuf, Reactor, ThreadPool};
use tests::backend_tests;

fn scratch(name: &str, r: &reactor::Reactor) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    dir.join(format!("pc-{name}-{}-{}", r.backend(), std::process::id()))
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(seed) % 251) as u8)
        .collect()
}

/// The file at `path` with `data`, written and read through std so its pages are cached.
fn cached_file(path: &PathBuf, data: &[u8]) -> File {
    std::fs::write(path, data).unwrap();
    assert_eq!(std::fs::read(path).unwrap().len(), data.len());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    File::from_std(f)
}

/// Drops the clean cached pages of `len` bytes at `offset` (after `fsync`).
fn evict(f: &File, offset: i64, len: i64) {
    let fd = f.as_raw_fd();
    // SAFETY: plain calls on an open fd; they touch no memory of ours.
    unsafe {
        assert_eq!(libc::fsync(fd), 0);
        assert_eq!(
            libc::posix_fadvise(fd, offset, len, libc::POSIX_FADV_DONTNEED),
            0
        );
    }
}

backend_tests! {
    fn cached_reads_complete_on_the_loop_thread(r: &Reactor) {
        let path = scratch("cached", r);
        let data = pattern(1 << 20, 7);
        let f = cached_file(&path, &data);
        let before = r.stats().inline_io;
        r.block_on(async {
            for off in [0usize, 4096, 12288, (1 << 20) - 4096] {
                let (res, buf) = f.read_at(Vec::with_capacity(4096), off as u64).await;
                assert_eq!(res.unwrap(), 4096);
                assert_eq!(buf[..], data[off..off + 4096]);
            }
            let (res, bufs) = f
                .readv_at(vec![Vec::with_capacity(100), Vec::with_capacity(5000)], 333)
                .await;
            assert_eq!(res.unwrap(), 5100);
            assert_eq!(bufs[0][..], data[333..433]);
            assert_eq!(bufs[1][..], data[433..5433]);
            // At the end of the file: 0, whichever way it ran.
            let (res, _) = f.read_at(Vec::with_capacity(10), 1 << 20).await;
            assert_eq!(res.unwrap(), 0);
        });
        let inline = r.stats().inline_io - before;
        assert!(inline >= 5, "cached reads ran inline: {inline}");
        std::fs::remove_file(&path).unwrap();
    }

    fn a_partly_cached_range_is_read_whole(r: &Reactor) {
        let path = scratch("partly", r);
        let len = 8 << 20;
        let data = pattern(len, 13);
        let f = cached_file(&path, &data);
        // The second half leaves the page cache: a non-blocking read could only return the
        // first half, which the caller must never see as a short read.
        evict(&f, (len / 2) as i64, (len / 2) as i64);
        r.block_on(async {
            let (res, buf) = f.read_at(Vec::with_capacity(len), 0).await;
            assert_eq!(res.unwrap(), len, "never short before the end of the file");
            assert!(buf == data, "the bytes of the whole range");
            evict(&f, 4096, (len - 4096) as i64);
            let (res, bufs) = f
                .readv_at(vec![Vec::with_capacity(4096), Vec::with_capacity(len - 4096)], 0)
                .await;
            assert_eq!(res.unwrap(), len, "never short before the end of the file");
            assert!(bufs[0] == data[..4096] && bufs[1] == data[4096..]);
        });
        std::fs::remove_file(&path).unwrap();
    }

    fn writes_land_whichever_way_they_ran(r: &Reactor) {
        let path = scratch("writes", r);
        let f = cached_file(&path, &pattern(64 << 10, 3));
        let new = pattern(64 << 10, 11);
        r.block_on(async {
            // Twice: the first write may find that the file system has no non-blocking buffered
            // writes (ext4), the second must then go straight to the pool.
            for round in 0..2 {
                let (res, _) = f.write_at(new[..8192].to_vec(), 4096).await;
                assert_eq!(res.unwrap(), 8192, "round {round}");
            }
            let (res, _) = f
                .writev_at(vec![new[..100].to_vec(), new[100..4096].to_vec()], 60 << 10)
                .await;
            assert_eq!(res.unwrap(), 4096);
        });
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 64 << 10);
        assert!(back[4096..12288] == new[..8192]);
        assert!(back[60 << 10..] == new[..4096]);
        std::fs::remove_file(&path).unwrap();
    }

    fn append_mode_writes_land_once_each(r: &Reactor) {
        let path = scratch("append", r);
        std::fs::write(&path, b"head:").unwrap();
        let f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        let f = File::from_std(f);
        r.block_on(async {
            for part in [&b"one,"[..], b"two,", &[b'x'; 70_000]] {
                // The offset is ignored in append mode: each write goes to the end, once.
                let (res, _) = f.write_at(part.to_vec(), 0).await;
                assert_eq!(res.unwrap(), part.len());
            }
        });
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 5 + 4 + 4 + 70_000);
        assert!(back.starts_with(b"head:one,two,x"));
        std::fs::remove_file(&path).unwrap();
    }

    fn direct_files_are_never_read_inline(r: &Reactor) {
        let path = scratch("direct", r);
        let data = pattern(64 << 10, 5);
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .expect("O_DIRECT open (the target directory's filesystem must support it)");
        let f = File::from_std(f);
        let before = r.stats().inline_io;
        r.block_on(async {
            for _ in 0..4 {
                let (res, buf) = f.read_at(AlignedBuf::new(16 << 10, 4096), 8192).await;
                assert_eq!(res.unwrap(), 16 << 10);
                assert_eq!(buf[..], data[8192..8192 + (16 << 10)]);
            }
        });
        assert_eq!(r.stats().inline_io, before, "a direct read waits for the device");
        std::fs::remove_file(&path).unwrap();
    }

    fn buffered_writes_on_the_pool_run_on_one_thread_in_order(r: &Reactor) {
        // A reactor of the same backend with a pool of its own, to count its threads.
        let pool = ThreadPool::new(0, 16, std::time::Duration::from_secs(30));
        let r = Reactor::builder()
            .backend(r.backend())
            .thread_pool(pool.clone())
            .build()
            .unwrap();
        let path = scratch("lane", &r);
        let f = std::rc::Rc::new(cached_file(&path, &pattern(1 << 20, 3)));
        // Else the writes would run on the loop thread, one by one (`inline_writes.rs`).
        f.set_inline_writes(false);
        let before = r.stats().inline_io;
        // 64 writes at once, overlapping in pairs: each later one must win.
        let writes: Vec<_> = (0..64u32)
            .map(|i| {
                let f = f.clone();
                let off = u64::from(i / 2) * 4096;
                r.spawn_local(async move {
                    let (res, _) = f.write_at(vec![i as u8; 4096], off).await;
                    assert_eq!(res.unwrap(), 4096);
                })
            })
            .collect();
        r.block_on(async {
            for w in writes {
                w.await.unwrap();
            }
        });
        let inline = r.stats().inline_io - before;
        let back = std::fs::read(&path).unwrap();
        if inline == 0 {
            // All went to the pool (ext4, tmpfs: no non-blocking buffered writes): one lane
            // ran the file's writes one at a time, in the order they were made: one thread,
            // or two where a drainer handed over (a lane yields its thread every 64 jobs, and
            // a new one may start before the last has gone idle) — not one per write.
            let threads = pool.threads();
            assert!(threads <= 2, "{threads} pool threads for one file's writes");
        }
        for i in 0..32usize {
            let page = &back[i * 4096..(i + 1) * 4096];
            let (first, second) = ((2 * i) as u8, (2 * i + 1) as u8);
            // Writes in flight together that overlap are not ordered unless they all ran
            // the same way (the lane, or inline in task order).
            let ordered = inline == 0 || inline == 64;
            assert!(
                page.iter().all(|&b| b == second) || (!ordered && page.iter().all(|&b| b == first)),
                "page {i} holds {} (inline {inline}): a later write was overtaken or torn",
                page[0]
            );
        }
        std::fs::remove_file(&path).unwrap();
    }
}
