//! Files: round trips, vectored I/O, sync, O_DIRECT, errors.

use std::path::PathBuf;

use reactor::AlignedBuf;
use reactor::fs::{File, OpenOptions};
use tests::backend_tests;

fn scratch(name: &str, r: &reactor::Reactor) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    dir.join(format!("fs-{name}-{}-{}", r.backend(), std::process::id()))
}

backend_tests! {
    fn offsets_no_file_can_have_are_invalid_input(r: &Reactor) {
        let path = scratch("offsets", r);
        r.block_on(async {
            let f = File::create(&path).await.unwrap();
            let (res, _) = f.write_at(b"x".to_vec(), 0).await;
            assert_eq!(res.unwrap(), 1);
            for offset in [i64::MAX as u64 + 1, u64::MAX] {
                // u64::MAX would mean "the file position" to io_uring: it must never get there.
                let (res, buf) = f.read_at(Vec::with_capacity(8), offset).await;
                let e = res.unwrap_err();
                assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
                assert!(buf.is_empty());
                let (res, _) = f.write_at(b"y".to_vec(), offset).await;
                assert_eq!(res.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
                let (res, _) = f.readv_at(vec![Vec::<u8>::with_capacity(4)], offset).await;
                assert_eq!(res.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
                let (res, _) = f.writev_at(vec![b"z".to_vec()], offset).await;
                assert_eq!(res.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
            }
            // A range that starts in bounds but would end past the largest offset.
            let (res, _) = f.write_all_at(vec![0u8; 16], i64::MAX as u64 - 4).await;
            assert!(res.is_err());
            // Too many buffers for one vectored call.
            let many: Vec<Vec<u8>> = (0..1025).map(|_| vec![0u8; 1]).collect();
            let (res, back) = f.writev_at(many, 0).await;
            assert_eq!(res.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
            assert_eq!(back.len(), 1025, "the buffers come back");
            // The file was not touched.
            let (res, buf) = f.read_at(Vec::with_capacity(8), 0).await;
            assert_eq!(res.unwrap(), 1);
            assert_eq!(buf, b"x");
        });
        std::fs::remove_file(&path).unwrap();
    }

    fn write_read_fsync_round_trip(r: &Reactor) {
        let path = scratch("roundtrip", r);
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expect = data.clone();
        let back = r.block_on(async {
            let f = File::create(&path).await?;
            let (res, _) = f.write_all_at(data, 4096).await;
            res?;
            f.fsync().await?;
            f.fdatasync().await?;
            let (res, buf) = f.read_at(Vec::with_capacity(2_000_000), 4096).await;
            let n = res?;
            assert_eq!(n, buf.len());
            let (res, hole) = f.read_at(vec![1u8; 4096], 0).await;
            assert_eq!(res?, 4096);
            assert!(hole.iter().all(|&b| b == 0), "the hole before the data reads as zeros");
            let (res, eof) = f.read_at(Vec::with_capacity(10), 10_000_000).await;
            assert_eq!(res?, 0, "end of file");
            assert!(eof.is_empty());
            std::io::Result::Ok(buf)
        })
        .unwrap();
        assert_eq!(back, expect);
        assert_eq!(std::fs::read(&path).unwrap()[4096..], expect[..]);
        std::fs::remove_file(&path).unwrap();
    }

    fn vectored_io(r: &Reactor) {
        let path = scratch("vectored", r);
        let (n, bufs) = r.block_on(async {
            let f = File::create(&path).await.unwrap();
            let (res, _) = f.writev_at(vec![b"abc".to_vec(), b"defg".to_vec(), b"h".to_vec()], 10).await;
            assert_eq!(res.unwrap(), 8);
            let bufs = vec![Vec::with_capacity(2), Vec::with_capacity(5), Vec::with_capacity(5)];
            let (res, bufs) = f.readv_at(bufs, 10).await;
            (res.unwrap(), bufs)
        });
        assert_eq!(n, 8);
        assert_eq!(bufs, vec![b"ab".to_vec(), b"cdefg".to_vec(), b"h".to_vec()]);
        std::fs::remove_file(&path).unwrap();
    }

    fn many_concurrent_operations(r: &Reactor) {
        let path = scratch("concurrent", r);
        r.block_on(async {
            let f = File::create(&path).await.unwrap();
            let writes: Vec<_> = (0..64u64)
                .map(|i| {
                    let f = f.clone();
                    reactor::Reactor::with_current(|r| {
                        r.spawn_local(async move {
                            let (res, _) = f.write_at(vec![i as u8; 4096], i * 4096).await;
                            assert_eq!(res.unwrap(), 4096);
                        })
                    })
                    .unwrap()
                })
                .collect();
            for w in writes {
                w.await.unwrap();
            }
            f.fdatasync().await.unwrap();
            for i in 0..64u64 {
                let (res, buf) = f.read_at(Vec::with_capacity(4096), i * 4096).await;
                assert_eq!(res.unwrap(), 4096);
                assert!(buf.iter().all(|&b| b == i as u8));
            }
        });
        std::fs::remove_file(&path).unwrap();
    }

    fn o_direct_with_an_aligned_buffer(r: &Reactor) {
        let path = scratch("direct", r);
        r.block_on(async {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .await
                .expect("O_DIRECT open (the target directory's filesystem must support it)");
            // SAFETY: F_GETFL on an open fd.
            let fl = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_GETFL) };
            assert_ne!(fl & libc::O_DIRECT, 0, "the file really is in O_DIRECT mode");
            let mut wbuf = AlignedBuf::new(64 * 1024, 4096);
            for (i, b) in wbuf.iter_mut().enumerate() {
                *b = (i % 253) as u8;
            }
            let expect = wbuf.to_vec();
            let (res, _) = f.write_at(wbuf, 8192).await;
            assert_eq!(res.unwrap(), 64 * 1024);
            f.fsync().await.unwrap();
            let (res, rbuf) = f.read_at(AlignedBuf::new(64 * 1024, 4096), 8192).await;
            assert_eq!(res.unwrap(), 64 * 1024);
            assert_eq!(&rbuf[..], &expect[..]);
        });
        std::fs::remove_file(&path).unwrap();
    }

    fn fallocate_allocates_punches_and_zeroes(r: &Reactor) {
        let path = scratch("fallocate", r);
        r.block_on(async {
            let f = File::create(&path).await.unwrap();
            f.fallocate(0, 0, 64 * 1024).await.unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 1024, "mode 0 extends");
            let (res, _) = f.write_all_at(vec![0xab; 64 * 1024], 0).await;
            res.unwrap();
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            f.fallocate(punch, 4096, 8192).await.unwrap();
            f.fallocate(libc::FALLOC_FL_ZERO_RANGE, 32 * 1024, 4096).await.unwrap();
            let (res, back) = f.read_at(Vec::with_capacity(64 * 1024), 0).await;
            assert_eq!(res.unwrap(), 64 * 1024);
            for (i, &b) in back.iter().enumerate() {
                let zero = (4096..12288).contains(&i) || (32768..36864).contains(&i);
                assert_eq!(b, if zero { 0 } else { 0xab }, "byte {i}");
            }
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 1024, "KEEP_SIZE");
            // Errors: zero length, an offset past off_t, a read-only file.
            let e = f.fallocate(0, 0, 0).await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
            let e = f.fallocate(0, u64::MAX, 1).await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
            let ro = File::open(&path).await.unwrap();
            let e = ro.fallocate(punch, 0, 4096).await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        });
        std::fs::remove_file(&path).unwrap();
    }

    fn fadvise_drops_and_reads_ahead_the_page_cache(r: &Reactor) {
        const LEN: usize = 1 << 20;
        let path = scratch("fadvise", r);
        std::fs::write(&path, vec![0x5a; LEN]).unwrap();
        r.block_on(async {
            let f = File::open(&path).await.unwrap();
            f.fsync().await.unwrap();
            // Clean pages go with DONTNEED; WILLNEED brings them back without a read.
            f.fadvise(0, 0, libc::POSIX_FADV_DONTNEED).await.unwrap();
            assert!(tests::resident_pages(&f, LEN) < LEN / 4096 / 2, "DONTNEED dropped the pages");
            f.fadvise(0, LEN as u32, libc::POSIX_FADV_WILLNEED).await.unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while tests::resident_pages(&f, LEN) < LEN / 4096 {
                assert!(std::time::Instant::now() < deadline, "WILLNEED read the range ahead");
                reactor::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let e = f.fadvise(0, 0, 4242).await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
            let e = f.fadvise(u64::MAX, 1, libc::POSIX_FADV_WILLNEED).await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        });
        std::fs::remove_file(&path).unwrap();
    }

    fn slices_append_reads_and_continue_writes(r: &Reactor) {
        use reactor::io::Slice;
        let path = scratch("slice", r);
        r.block_on(async {
            let f = File::create(&path).await.unwrap();
            let (res, _) = f.write_at(Slice::new(b"skip-this:payload".to_vec(), 10), 0).await;
            assert_eq!(res.unwrap(), 7);
            // Read behind a header already in the buffer: the header stays, the length grows.
            let mut buf = Vec::with_capacity(4 + 7);
            buf.extend_from_slice(b"hdr:");
            let (res, s) = f.read_at(Slice::new(buf, 4), 0).await;
            assert_eq!(res.unwrap(), 7);
            assert_eq!(s.into_inner(), b"hdr:payload");
        });
        std::fs::remove_file(&path).unwrap();
    }

    fn open_errors(r: &Reactor) {
        r.block_on(async {
            let e = File::open("/nonexistent/reactor/file").await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
            let e = File::open("bad\0path").await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
            let e = OpenOptions::new().open("/dev/null").await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
            let ro = File::open("/proc/self/status").await.unwrap();
            let (res, buf) = ro.write_at(b"x".to_vec(), 0).await;
            assert!(res.is_err(), "writing a read-only file fails");
            assert_eq!(buf, b"x", "and the buffer comes back");
        });
    }

    fn file_ops_outside_a_reactor_fail_cleanly(r: &Reactor) {
        let _ = r;
        let f = File::from_std(std::fs::File::open("/proc/self/status").unwrap());
        let mut fut = std::pin::pin!(f.read_at(Vec::with_capacity(8), 0));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let std::task::Poll::Ready((res, buf)) = fut.as_mut().poll(&mut cx) else { panic!("pending") };
        assert_eq!(res.unwrap_err().kind(), std::io::ErrorKind::Other);
        assert_eq!(buf.capacity(), 8, "the buffer comes back");
    }
}
