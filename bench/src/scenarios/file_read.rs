//! `file-read`: 4 KiB reads over a 256 MiB file, random and sequential (wrapping at the end,
//! the pattern of `qemu-img bench`), at queue depth 1 and 32, page-cached and `O_DIRECT`
//! (IOPS). Beside the reactor: two raw io_uring loops (the floors: a plain ring, and a tuned one
//! with `SINGLE_ISSUER | DEFER_TASKRUN`, a registered file and registered buffers), compio,
//! tokio (positional reads go through its blocking pool) and, for the sequential rows, `qemu-img bench` itself
//! when it is on the PATH.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use reactor::{AlignedBuf, Backend, IoBufMut, Reactor};

use crate::measure::{Metric, Sample, time};
use crate::scenarios::{Ctx, Row};

const FILE_SIZE: u64 = 256 << 20;
const BLOCK: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Random,
    Sequential,
}

#[derive(Clone, Copy)]
struct Case {
    pattern: Pattern,
    depth: usize,
    direct: bool,
    reads: u64,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "file-{}-4k-qd{}-{}",
            if self.pattern == Pattern::Random {
                "rand"
            } else {
                "seq"
            },
            self.depth,
            if self.direct { "direct" } else { "cached" }
        )
    }

    /// Offset of read number `i` (random: a hash of `i`; sequential: wrapping).
    fn offset(&self, i: u64) -> u64 {
        let blocks = FILE_SIZE / BLOCK as u64;
        let b = match self.pattern {
            Pattern::Sequential => i % blocks,
            Pattern::Random => {
                let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
                x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (x ^ (x >> 31)) % blocks
            }
        };
        b * BLOCK as u64
    }
}

/// The test file, created once under `target/bench-data` (a real filesystem: `O_DIRECT` needs
/// one) with non-zero data, so that reads are not served from holes.
fn data_file() -> PathBuf {
    let dir = Path::new("target").join("bench-data");
    std::fs::create_dir_all(&dir).expect("create target/bench-data");
    let path = dir.join("file-read-256M.img");
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(FILE_SIZE) {
        eprintln!("  creating {} ({} MiB)", path.display(), FILE_SIZE >> 20);
        let mut chunk = vec![0u8; 1 << 20];
        let mut f = std::fs::File::create(&path).expect("create the data file");
        for i in 0..(FILE_SIZE >> 20) {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i as usize * 131 + j * 7 + 1) as u8;
            }
            std::io::Write::write_all(&mut f, &chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    path
}

/// Warms the page cache with the whole file.
fn warm(path: &Path) {
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut std::io::sink()).unwrap();
}

pub fn run(ctx: &Ctx) -> Vec<Row> {
    let path = data_file();
    warm(&path);
    let mut rows = Vec::new();
    for pattern in [Pattern::Random, Pattern::Sequential] {
        for direct in [false, true] {
            for depth in [1usize, 32] {
                let reads = match (direct, depth) {
                    (false, _) => ctx.scale(200_000, 25_000),
                    (true, 1) => ctx.scale(10_000, 1_000),
                    (true, _) => ctx.scale(60_000, 6_000),
                };
                let case = Case {
                    pattern,
                    depth,
                    direct,
                    reads,
                };
                let name = case.name();
                for b in [Backend::Uring, Backend::Epoll] {
                    rows.push(
                        ctx.row(&name, &format!("reactor-{b}"), Metric::OpsPerSec, || {
                            reactor_reads(&path, case, b)
                        }),
                    );
                }
                rows.push(ctx.row(&name, "tokio", Metric::OpsPerSec, || {
                    tokio_reads(&path, case)
                }));
                rows.push(ctx.row(&name, "compio", Metric::OpsPerSec, || {
                    compio_reads(&path, case)
                }));
                rows.push(ctx.row(&name, "floor-raw-uring", Metric::OpsPerSec, || {
                    raw_uring_reads(&path, case)
                }));
                rows.push(ctx.row(&name, "floor-tuned-uring", Metric::OpsPerSec, || {
                    tuned_uring_reads(&path, case)
                }));
                if pattern == Pattern::Sequential {
                    match super::qemu::available("qemu-img") {
                        true => {
                            rows.push(ctx.row(&name, "qemu-img-bench", Metric::OpsPerSec, || {
                                qemu_img_bench(&path, case)
                            }))
                        }
                        false => eprintln!("  qemu-img is not on the PATH: no QEMU row for {name}"),
                    }
                }
            }
        }
    }
    rows
}

/// Checks a block read at `off`: its bytes are the ones `data_file` wrote there.
fn check(buf: &[u8], off: u64) {
    assert_eq!(buf.len(), BLOCK, "short read at {off}");
    let i = (off >> 20) as usize;
    let j0 = (off & ((1 << 20) - 1)) as usize;
    for (k, &b) in buf.iter().enumerate().step_by(509) {
        assert_eq!(
            b,
            (i * 131 + (j0 + k) * 7 + 1) as u8,
            "wrong data at {}",
            off + k as u64
        );
    }
}

fn std_open(path: &Path, direct: bool) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .expect("open the data file")
}

fn reactor_reads(path: &Path, case: Case, backend: Backend) -> Sample {
    let r = Reactor::builder().backend(backend).build().unwrap();
    assert_eq!(r.backend(), backend);
    let file = reactor::fs::File::from_std(std_open(path, case.direct));
    let next = Rc::new(Cell::new(0u64));
    let allocs = crate::allocs::thread_allocs();
    let sample = time(Metric::OpsPerSec, case.reads, || {
        r.block_on(async {
            let workers: Vec<_> = (0..case.depth)
                .map(|_| {
                    let (f, next) = (file.clone(), next.clone());
                    Reactor::with_current(|r| {
                        r.spawn_local(async move {
                            let mut buf = AlignedBuf::new(BLOCK, BLOCK);
                            loop {
                                let i = next.get();
                                if i >= case.reads {
                                    return;
                                }
                                next.set(i + 1);
                                let off = case.offset(i);
                                let (res, b) = f.read_at(buf, off).await;
                                assert_eq!(res.expect("read"), BLOCK);
                                check(&b, off);
                                buf = b;
                            }
                        })
                    })
                    .unwrap()
                })
                .collect();
            for w in workers {
                w.await.unwrap();
            }
        })
    });
    // (On epoll the reads run on pool threads, which this thread's count does not see.)
    let per_op = (crate::allocs::thread_allocs() - allocs) as f64 / case.reads as f64;
    sample.with_allocs(per_op)
}

fn tokio_reads(path: &Path, case: Case) -> Sample {
    use std::os::unix::fs::FileExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let file = std::sync::Arc::new(std_open(path, case.direct));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    time(Metric::OpsPerSec, case.reads, || {
        rt.block_on(async {
            let workers: Vec<_> = (0..case.depth)
                .map(|_| {
                    let (f, next) = (file.clone(), next.clone());
                    tokio::spawn(async move {
                        let mut buf = Some(AlignedBuf::new(BLOCK, BLOCK));
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= case.reads {
                                return;
                            }
                            let off = case.offset(i);
                            let (f2, mut b) = (f.clone(), buf.take().unwrap());
                            let b = tokio::task::spawn_blocking(move || {
                                let n = f2.read_at(&mut b, off).expect("read");
                                assert_eq!(n, BLOCK);
                                b
                            })
                            .await
                            .unwrap();
                            check(&b, off);
                            buf = Some(b);
                        }
                    })
                })
                .collect();
            for w in workers {
                w.await.unwrap();
            }
        })
    })
}

/// `AlignedBuf` in compio's buffer traits, for its `O_DIRECT` reads.
struct CompioBuf(AlignedBuf);

impl compio::buf::IoBuf for CompioBuf {
    fn as_init(&self) -> &[u8] {
        &self.0
    }
}

impl compio::buf::SetLen for CompioBuf {
    unsafe fn set_len(&mut self, len: usize) {
        self.0.resize(len);
    }
}

impl compio::buf::IoBufMut for CompioBuf {
    fn as_uninit(&mut self) -> &mut [std::mem::MaybeUninit<u8>] {
        let cap = self.0.capacity();
        // SAFETY: the whole capacity is allocated (and zeroed) and owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.stable_mut_ptr().cast(), cap) }
    }
}

fn compio_reads(path: &Path, case: Case) -> Sample {
    use compio::io::AsyncReadAt;
    let rt = compio::runtime::Runtime::new().unwrap();
    let path = path.to_owned();
    time(Metric::OpsPerSec, case.reads, || {
        rt.block_on(async {
            let mut opts = compio::fs::OpenOptions::new();
            opts.read(true);
            if case.direct {
                opts.custom_flags(libc::O_DIRECT);
            }
            let file = Rc::new(opts.open(&path).await.expect("compio open"));
            let next = Rc::new(Cell::new(0u64));
            let workers: Vec<_> = (0..case.depth)
                .map(|_| {
                    let (f, next) = (file.clone(), next.clone());
                    compio::runtime::spawn(async move {
                        let mut buf = CompioBuf(AlignedBuf::new(BLOCK, BLOCK));
                        loop {
                            let i = next.get();
                            if i >= case.reads {
                                return;
                            }
                            next.set(i + 1);
                            let off = case.offset(i);
                            buf.0.resize(0);
                            let compio::BufResult(res, b) = f.read_at(buf, off).await;
                            assert_eq!(res.expect("compio read"), BLOCK);
                            check(&b.0, off);
                            buf = b;
                        }
                    })
                })
                .collect();
            for w in workers {
                w.await.expect("compio task");
            }
        })
    })
}

/// The floor: a bare io_uring loop keeping `depth` reads in flight.
fn raw_uring_reads(path: &Path, case: Case) -> Sample {
    use io_uring::{IoUring, opcode, types};
    let file = std_open(path, case.direct);
    let mut ring = IoUring::new(64).unwrap();
    let mut bufs: Vec<AlignedBuf> = (0..case.depth)
        .map(|_| AlignedBuf::new(BLOCK, BLOCK))
        .collect();
    let mut offs = vec![0u64; case.depth];
    let fd = types::Fd(file.as_raw_fd());
    let push = |ring: &mut IoUring, buf: &mut AlignedBuf, off: u64, slot: usize| {
        let e = opcode::Read::new(fd, buf.stable_mut_ptr(), BLOCK as u32)
            .offset(off)
            .build()
            .user_data(slot as u64);
        // SAFETY: the buffer of `slot` is not touched until this read completes.
        unsafe { ring.submission().push(&e).unwrap() };
    };
    time(Metric::OpsPerSec, case.reads, || {
        let (mut issued, mut done) = (0u64, 0u64);
        for slot in 0..case.depth.min(case.reads as usize) {
            offs[slot] = case.offset(issued);
            issued += 1;
            push(&mut ring, &mut bufs[slot], offs[slot], slot);
        }
        while done < case.reads {
            ring.submit_and_wait(1).unwrap();
            let cqes: Vec<(usize, i32)> = ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            for (slot, res) in cqes {
                assert_eq!(res, BLOCK as i32, "raw read");
                check(&bufs[slot], offs[slot]);
                done += 1;
                if issued < case.reads {
                    offs[slot] = case.offset(issued);
                    issued += 1;
                    push(&mut ring, &mut bufs[slot], offs[slot], slot);
                }
            }
        }
    })
}

/// The tuned floor: the same reads on a ring set up as well as the kernel allows for one
/// thread (`SINGLE_ISSUER | DEFER_TASKRUN`), with the file registered (fixed file 0) and every
/// buffer registered (`READ_FIXED`), completions reaped in place in batches (no allocation).
/// What the reactor's io_uring path could reach at best.
fn tuned_uring_reads(path: &Path, case: Case) -> Sample {
    use io_uring::{IoUring, opcode, types};
    let file = std_open(path, case.direct);
    // One aligned region, a block per slot, registered as one buffer each. Declared before the
    // ring, so that the ring goes first even when a check panics.
    let mut region = AlignedBuf::new(BLOCK * case.depth, BLOCK);
    let base = region.stable_mut_ptr();
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(64)
        .expect("an io_uring with SINGLE_ISSUER | DEFER_TASKRUN (kernel 6.1 or later)");
    ring.submitter()
        .register_files(&[file.as_raw_fd()])
        .expect("register the file");
    let iovs: Vec<libc::iovec> = (0..case.depth)
        .map(|slot| libc::iovec {
            // SAFETY: `slot * BLOCK` is inside the region.
            iov_base: unsafe { base.add(slot * BLOCK) }.cast(),
            iov_len: BLOCK,
        })
        .collect();
    // SAFETY: the region outlives the ring (declared before it, dropped after it).
    unsafe { ring.submitter().register_buffers(&iovs) }.expect("register the buffers");
    let mut offs = vec![0u64; case.depth];
    let sample = time(Metric::OpsPerSec, case.reads, || {
        let (submitter, mut sq, mut cq) = ring.split();
        let push = |sq: &mut io_uring::SubmissionQueue<'_>, off: u64, slot: usize| {
            // SAFETY: slot's block is not touched until this read completes.
            let ptr = unsafe { base.add(slot * BLOCK) };
            let e = opcode::ReadFixed::new(types::Fixed(0), ptr, BLOCK as u32, slot as u16)
                .offset(off)
                .build()
                .user_data(slot as u64);
            // SAFETY: the block is registered and stays valid until the read completes.
            unsafe { sq.push(&e).expect("room: one SQE per slot") };
        };
        let (mut issued, mut done) = (0u64, 0u64);
        for (slot, off) in offs.iter_mut().enumerate().take(case.reads as usize) {
            *off = case.offset(issued);
            issued += 1;
            push(&mut sq, *off, slot);
        }
        sq.sync();
        while done < case.reads {
            submitter.submit_and_wait(1).expect("io_uring_enter");
            cq.sync();
            for c in &mut cq {
                let slot = c.user_data() as usize;
                assert_eq!(c.result(), BLOCK as i32, "tuned read");
                // SAFETY: the read into slot's block has completed; nothing else writes it.
                let block = unsafe { std::slice::from_raw_parts(base.add(slot * BLOCK), BLOCK) };
                check(block, offs[slot]);
                done += 1;
                if issued < case.reads {
                    offs[slot] = case.offset(issued);
                    issued += 1;
                    push(&mut sq, offs[slot], slot);
                }
            }
            sq.sync();
        }
    });
    drop(ring);
    drop(region);
    sample
}

/// `qemu-img bench` on the same file: its sequential pattern, wrapping at the end.
fn qemu_img_bench(path: &Path, case: Case) -> Sample {
    let (depth, reads) = (case.depth.to_string(), case.reads.to_string());
    let cache = if case.direct { "none" } else { "writeback" };
    let took = super::qemu::img_bench(&[
        "-f",
        "raw",
        "-i",
        "io_uring",
        "-s",
        "4096",
        "-t",
        cache,
        "-d",
        &depth,
        "-c",
        &reads,
        path.to_str().expect("a UTF-8 path"),
    ]);
    Sample::timed(Metric::OpsPerSec, case.reads, took)
}
