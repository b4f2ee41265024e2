//! Registered (fixed) buffers: `FixedBufPool`, `File::read_at_fixed` and `write_at_fixed`, on
//! both backends (io_uring: `READ_FIXED`/`WRITE_FIXED`; epoll: ordinary reads and writes).

use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use reactor::fs::{File, FixedBufPool, MAX_FIXED_BUFFERS};
use tests::backend_tests;

fn scratch(name: &str, r: &reactor::Reactor) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    dir.join(format!(
        "fixed-{name}-{}-{}",
        r.backend(),
        std::process::id()
    ))
}

fn open(path: &PathBuf, direct: bool) -> File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .expect("open (O_DIRECT needs a file system that has it)");
    File::from_std(f)
}

backend_tests! {
    fn round_trips_cached_and_direct(r: &Reactor) {
        let pool = FixedBufPool::new(r, 4, 16 << 10, 4096).unwrap();
        for direct in [false, true] {
            let path = scratch(if direct { "direct" } else { "cached" }, r);
            std::fs::write(&path, vec![0u8; 256 << 10]).unwrap();
            let f = open(&path, direct);
            r.block_on(async {
                for (i, off) in [0u64, 16 << 10, 128 << 10, 240 << 10].into_iter().enumerate() {
                    let mut w = pool.try_take().unwrap();
                    for (k, b) in w.iter_mut().enumerate() {
                        *b = (k as u64 * 7 + off + i as u64) as u8;
                    }
                    let expect = w.to_vec();
                    let (res, w) = f.write_at_fixed(w, off).await;
                    assert_eq!(res.unwrap(), 16 << 10);
                    drop(w);
                    let (res, back) = f.read_at_fixed(pool.try_take().unwrap(), off).await;
                    assert_eq!(res.unwrap(), 16 << 10);
                    assert!(back[..] == expect[..], "the bytes written at {off}");
                }
                // A shorter write: the buffer's length is what goes out.
                let mut w = pool.try_take().unwrap();
                w.resize(4096);
                w.fill(0xab);
                let (res, _) = f.write_at_fixed(w, 64 << 10).await;
                assert_eq!(res.unwrap(), 4096);
            });
            let on_disk = std::fs::read(&path).unwrap();
            assert!(on_disk[64 << 10..(64 << 10) + 4096].iter().all(|&b| b == 0xab));
            assert_eq!(pool.available(), 4, "every buffer came back");
            std::fs::remove_file(&path).unwrap();
        }
    }

    fn buffers_run_out_and_come_back(r: &Reactor) {
        let pool = FixedBufPool::new(r, 3, 4096, 512).unwrap();
        assert_eq!((pool.count(), pool.buffer_size(), pool.available()), (3, 4096, 3));
        let taken: Vec<_> = (0..3).map(|_| pool.try_take().unwrap()).collect();
        let mut idx: Vec<u16> = taken.iter().map(|b| b.index()).collect();
        idx.sort();
        assert_eq!(idx, [0, 1, 2], "each index once");
        assert!(pool.try_take().is_none(), "all taken");
        assert_eq!(pool.available(), 0);
        drop(taken);
        assert_eq!(pool.available(), 3);
        let b = pool.try_take().unwrap();
        assert_eq!(b.len(), 4096, "a taken buffer is its whole capacity");
    }

    fn one_registered_pool_per_reactor(r: &Reactor) {
        let first = FixedBufPool::new(r, 2, 4096, 4096).unwrap();
        let held = first.try_take().unwrap();
        let e = FixedBufPool::new(r, 2, 4096, 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        drop(first);
        // A buffer still out keeps the pool, and so its registration.
        let e = FixedBufPool::new(r, 2, 4096, 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        drop(held);
        // Gone outside the loop: the next registration replaces it.
        let second = FixedBufPool::new(r, 2, 4096, 4096).unwrap();
        // Dropped inside the loop: unregistered at once, and a third can come.
        r.block_on(async move { drop(second) });
        FixedBufPool::new(r, 8, 4096, 4096).unwrap();
    }

    fn a_buffer_of_another_reactors_pool_still_works(r: &Reactor) {
        let other = tests::reactor_on(r.backend());
        let foreign = FixedBufPool::new(&other, 1, 8192, 4096).unwrap();
        let path = scratch("foreign", r);
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let f = open(&path, true);
        r.block_on(async {
            let (res, buf) = f.read_at_fixed(foreign.try_take().unwrap(), 0).await;
            assert_eq!(res.unwrap(), 8192, "read as an ordinary buffer on this ring");
            assert!(buf.iter().all(|&b| b == 7));
        });
        std::fs::remove_file(&path).unwrap();
    }

    fn bad_pool_sizes_are_invalid_input(r: &Reactor) {
        for (count, size, align) in [
            (0, 4096, 4096),
            (MAX_FIXED_BUFFERS + 1, 4096, 4096),
            (1, 0, 4096),
            (1, (1 << 30) + 1, 4096),
            (1, 4096, 3000),
        ] {
            let e = FixedBufPool::new(r, count, size, align).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{count} x {size} / {align}: {e}");
        }
        // Nothing was registered by the failures.
        FixedBufPool::new(r, 1, 4096, 4096).unwrap();
    }

    fn errors_and_offsets_as_read_at(r: &Reactor) {
        let pool = FixedBufPool::new(r, 1, 4096, 4096).unwrap();
        let path = scratch("errors", r);
        std::fs::write(&path, b"abc").unwrap();
        let ro = File::from_std(std::fs::File::open(&path).unwrap());
        r.block_on(async {
            let (res, buf) = ro.read_at_fixed(pool.try_take().unwrap(), i64::MAX as u64 + 1).await;
            assert_eq!(res.unwrap_err().kind(), ErrorKind::InvalidInput);
            let (res, buf) = ro.read_at_fixed(buf, 0).await;
            assert_eq!(res.unwrap(), 3, "short at the end of the file");
            assert_eq!(&buf[..], b"abc");
            let (res, _) = ro.write_at_fixed(buf, 0).await;
            assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::EBADF), "read-only file");
        });
        assert_eq!(pool.available(), 1);
        std::fs::remove_file(&path).unwrap();
    }
}
