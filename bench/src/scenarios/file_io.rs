//! `file-read` and `file-write`: 4 KiB reads or writes over a 256 MiB file, random and
//! sequential (wrapping at the end, the pattern of `qemu-img bench`), at queue depth 1 and 32,
//! page-cached and `O_DIRECT` (IOPS). Beside the reactor: two raw io_uring loops (the floors: a
//! plain ring, and a tuned one with `SINGLE_ISSUER | DEFER_TASKRUN`, a registered file and
//! registered buffers), for the cached rows a plain `pread`/`pwrite` loop on one thread (the
//! synchronous floor), compio, tokio (positional I/O goes through its blocking pool) and, for
//! the sequential rows, `qemu-img bench` itself when it is on the PATH.
//!
//! Reads check every block's bytes. Writes go to a file of their own (the reads' file stays
//! as it was written) and write one constant block, so that no system pays for filling it.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use reactor::fs::FixedBufPool;
use reactor::{AlignedBuf, Backend, IoBufMut, Reactor};

use crate::measure::{Metric, Sample, time};
use crate::scenarios::{Ctx, Row, System};

const FILE_SIZE: u64 = 256 << 20;
const BLOCK: usize = 4096;
/// The byte every written block is made of.
const WRITTEN: u8 = 0x5a;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Random,
    Sequential,
}

#[derive(Clone, Copy)]
struct Case {
    write: bool,
    pattern: Pattern,
    depth: usize,
    direct: bool,
    ops: u64,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "file-{}{}-4k-qd{}-{}",
            if self.write { "write-" } else { "" },
            if self.pattern == Pattern::Random {
                "rand"
            } else {
                "seq"
            },
            self.depth,
            if self.direct { "direct" } else { "cached" }
        )
    }

    /// Offset of operation number `i` (random: a hash of `i`; sequential: wrapping).
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

    /// The offset of the next operation of a run that counts them in `next`, or `None` when
    /// all were issued.
    fn next_offset(&self, next: &Cell<u64>) -> Option<u64> {
        let i = next.get();
        (i < self.ops).then(|| {
            next.set(i + 1);
            self.offset(i)
        })
    }

    /// A buffer for one operation: zeroed for a read, the written block for a write.
    fn buf(&self) -> AlignedBuf {
        let mut b = AlignedBuf::new(BLOCK, BLOCK);
        if self.write {
            b.fill(WRITTEN);
        }
        b
    }

    /// Checks what one operation at `off` did: a read's bytes are the ones `data_file` wrote
    /// there; a write wrote the whole block.
    fn check(&self, n: usize, buf: &[u8], off: u64) {
        assert_eq!(n, BLOCK, "short transfer at {off}");
        if !self.write {
            check(buf, off);
        }
    }
}

/// A file of `FILE_SIZE` bytes under `target/bench-data` (a real filesystem: `O_DIRECT` needs
/// one) with non-zero data, so that reads are not served from holes and writes overwrite
/// allocated blocks; created once.
fn data_file(name: &str) -> PathBuf {
    let dir = Path::new("target").join("bench-data");
    std::fs::create_dir_all(&dir).expect("create target/bench-data");
    let path = dir.join(name);
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

/// `file-read`.
pub fn run_reads(ctx: &Ctx) -> Vec<Row> {
    run(ctx, false)
}

/// `file-write`.
pub fn run_writes(ctx: &Ctx) -> Vec<Row> {
    run(ctx, true)
}

fn run(ctx: &Ctx, write: bool) -> Vec<Row> {
    let path = data_file(if write {
        "file-write-256M.img"
    } else {
        "file-read-256M.img"
    });
    warm(&path);
    let mut rows = Vec::new();
    for pattern in [Pattern::Random, Pattern::Sequential] {
        for direct in [false, true] {
            for depth in [1usize, 32] {
                let ops = match (direct, depth) {
                    (false, _) => ctx.scale(200_000, 25_000),
                    (true, 1) => ctx.scale(10_000, 1_000),
                    (true, _) => ctx.scale(60_000, 6_000),
                };
                let case = Case {
                    write,
                    pattern,
                    depth,
                    direct,
                    ops,
                };
                rows.extend(case_rows(ctx, &path, case));
            }
        }
    }
    rows
}

/// Before each run of a write case: the file's dirty pages written back, so that every system
/// starts from the same page-cache state (otherwise a run inherits the writeback that the runs
/// before it left, and the order of the rows decides part of the result).
fn settle(path: &Path, case: Case) {
    if case.write {
        let f = std::fs::File::open(path).expect("open the data file");
        f.sync_data().expect("fdatasync the data file");
    }
}

fn case_rows(ctx: &Ctx, path: &Path, case: Case) -> Vec<Row> {
    let name = case.name();
    // Each run starts from a settled page cache (see `settle`).
    let settled = |name: &str, f: fn(&Path, Case) -> Sample| {
        System::new(name, move || {
            settle(path, case);
            f(path, case)
        })
    };
    let mut systems = vec![
        settled("reactor-uring", |p, c| {
            reactor_io(p, c, Backend::Uring, false)
        }),
        settled("reactor-epoll", |p, c| {
            reactor_io(p, c, Backend::Epoll, false)
        }),
        settled("reactor-uring-fixed", |p, c| {
            reactor_io(p, c, Backend::Uring, true)
        }),
        settled("tokio", tokio_io),
        settled("compio", compio_io),
    ];
    // On page-cached writes the ring loops are no floor: ext4 has no async buffered writes, so
    // the kernel hands each to an io-wq worker (tens of thousands per second, against the
    // hundreds of thousands the inline path and `floor-pwrite` make). They stay, named for
    // what they are.
    let ring_floors = if case.write && !case.direct {
        ["raw-uring", "tuned-uring"]
    } else {
        ["floor-raw-uring", "floor-tuned-uring"]
    };
    systems.push(settled(ring_floors[0], raw_uring_io));
    systems.push(settled(ring_floors[1], tuned_uring_io));
    if !case.direct {
        let floor = if case.write {
            "floor-pwrite"
        } else {
            "floor-pread"
        };
        systems.push(settled(floor, sync_io));
    }
    if case.pattern == Pattern::Sequential {
        match super::qemu::available("qemu-img") {
            true => systems.push(settled("qemu-img-bench", qemu_img_bench)),
            false => eprintln!("  qemu-img is not on the PATH: no QEMU row for {name}"),
        }
    }
    ctx.interleave(&name, Metric::OpsPerSec, systems)
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

fn std_open(path: &Path, case: Case) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(case.write)
        .custom_flags(if case.direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .expect("open the data file")
}

/// The reactor's `File` with ordinary buffers, or with `fixed` buffers from a
/// `FixedBufPool` (`read_at_fixed`/`write_at_fixed`).
fn reactor_io(path: &Path, case: Case, backend: Backend, fixed: bool) -> Sample {
    let r = Reactor::builder().backend(backend).build().unwrap();
    assert_eq!(r.backend(), backend);
    let file = reactor::fs::File::from_std(std_open(path, case));
    let pool = fixed.then(|| FixedBufPool::new(&r, case.depth, BLOCK, BLOCK).expect("register"));
    let next = Rc::new(Cell::new(0u64));
    let allocs = crate::allocs::thread_allocs();
    let sample = time(Metric::OpsPerSec, case.ops, || {
        r.block_on(async {
            let workers: Vec<_> = (0..case.depth)
                .map(|_| {
                    let (f, next) = (file.clone(), next.clone());
                    let fixed_buf = pool.as_ref().map(|p| {
                        let mut b = p.try_take().expect("a buffer per worker");
                        b.fill(if case.write { WRITTEN } else { 0 });
                        b
                    });
                    Reactor::with_current(|r| {
                        r.spawn_local(async move {
                            match fixed_buf {
                                Some(mut buf) => {
                                    while let Some(off) = case.next_offset(&next) {
                                        let (res, b) = if case.write {
                                            f.write_at_fixed(buf, off).await
                                        } else {
                                            f.read_at_fixed(buf, off).await
                                        };
                                        case.check(res.expect("file I/O"), &b, off);
                                        buf = b;
                                    }
                                }
                                None => {
                                    let mut buf = case.buf();
                                    while let Some(off) = case.next_offset(&next) {
                                        let (res, b) = if case.write {
                                            f.write_at(buf, off).await
                                        } else {
                                            f.read_at(buf, off).await
                                        };
                                        case.check(res.expect("file I/O"), &b, off);
                                        buf = b;
                                    }
                                }
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
    // (Operations that ran on pool threads allocate there, which this thread's count does
    // not see.)
    let per_op = (crate::allocs::thread_allocs() - allocs) as f64 / case.ops as f64;
    sample.with_allocs(per_op)
}

/// One positional transfer with std: a read or a write of the whole block.
fn std_io(f: &std::fs::File, case: Case, buf: &mut AlignedBuf, off: u64) -> usize {
    use std::os::unix::fs::FileExt;
    if case.write {
        f.write_at(buf, off).expect("pwrite")
    } else {
        f.read_at(buf, off).expect("pread")
    }
}

fn tokio_io(path: &Path, case: Case) -> Sample {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let file = std::sync::Arc::new(std_open(path, case));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    time(Metric::OpsPerSec, case.ops, || {
        rt.block_on(async {
            let workers: Vec<_> = (0..case.depth)
                .map(|_| {
                    let (f, next) = (file.clone(), next.clone());
                    tokio::spawn(async move {
                        let mut buf = Some(case.buf());
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= case.ops {
                                return;
                            }
                            let off = case.offset(i);
                            let (f2, mut b) = (f.clone(), buf.take().unwrap());
                            let (n, b) = tokio::task::spawn_blocking(move || {
                                (std_io(&f2, case, &mut b, off), b)
                            })
                            .await
                            .unwrap();
                            case.check(n, &b, off);
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

/// The synchronous floor: `pread`/`pwrite` in a loop on one thread (the queue depth does not
/// apply: one call at a time).
fn sync_io(path: &Path, case: Case) -> Sample {
    let file = std_open(path, case);
    let mut buf = case.buf();
    time(Metric::OpsPerSec, case.ops, || {
        for i in 0..case.ops {
            let off = case.offset(i);
            let n = std_io(&file, case, &mut buf, off);
            case.check(n, &buf, off);
        }
    })
}

/// `AlignedBuf` in compio's buffer traits, for its `O_DIRECT` I/O.
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

fn compio_io(path: &Path, case: Case) -> Sample {
    use compio::io::{AsyncReadAt, AsyncWriteAt};
    let rt = compio::runtime::Runtime::new().unwrap();
    let path = path.to_owned();
    time(Metric::OpsPerSec, case.ops, || {
        rt.block_on(async {
            let mut opts = compio::fs::OpenOptions::new();
            opts.read(true).write(case.write);
            if case.direct {
                opts.custom_flags(libc::O_DIRECT);
            }
            let file = Rc::new(opts.open(&path).await.expect("compio open"));
            let next = Rc::new(Cell::new(0u64));
            let workers: Vec<_> = (0..case.depth)
                .map(|_| {
                    let (f, next) = (file.clone(), next.clone());
                    compio::runtime::spawn(async move {
                        let mut buf = CompioBuf(case.buf());
                        while let Some(off) = case.next_offset(&next) {
                            let compio::BufResult(res, b) = if case.write {
                                (&*f).write_at(buf, off).await
                            } else {
                                buf.0.resize(0);
                                f.read_at(buf, off).await
                            };
                            case.check(res.expect("compio I/O"), &b.0, off);
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

/// The SQE of one plain transfer of `buf` at `off`.
fn plain_sqe(
    case: Case,
    fd: io_uring::types::Fd,
    buf: *mut u8,
    off: u64,
) -> io_uring::squeue::Entry {
    use io_uring::opcode;
    if case.write {
        opcode::Write::new(fd, buf, BLOCK as u32)
            .offset(off)
            .build()
    } else {
        opcode::Read::new(fd, buf, BLOCK as u32).offset(off).build()
    }
}

/// The floor: a bare io_uring loop keeping `depth` operations in flight.
fn raw_uring_io(path: &Path, case: Case) -> Sample {
    use io_uring::{IoUring, types};
    let file = std_open(path, case);
    let mut ring = IoUring::new(64).unwrap();
    let mut bufs: Vec<AlignedBuf> = (0..case.depth).map(|_| case.buf()).collect();
    let mut offs = vec![0u64; case.depth];
    let fd = types::Fd(file.as_raw_fd());
    let push = |ring: &mut IoUring, buf: &mut AlignedBuf, off: u64, slot: usize| {
        let e = plain_sqe(case, fd, buf.stable_mut_ptr(), off).user_data(slot as u64);
        // SAFETY: the buffer of `slot` is not touched until this operation completes.
        unsafe { ring.submission().push(&e).unwrap() };
    };
    time(Metric::OpsPerSec, case.ops, || {
        let (mut issued, mut done) = (0u64, 0u64);
        for slot in 0..case.depth.min(case.ops as usize) {
            offs[slot] = case.offset(issued);
            issued += 1;
            push(&mut ring, &mut bufs[slot], offs[slot], slot);
        }
        while done < case.ops {
            ring.submit_and_wait(1).unwrap();
            let cqes: Vec<(usize, i32)> = ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            for (slot, res) in cqes {
                assert!(
                    res >= 0,
                    "raw I/O: {}",
                    std::io::Error::from_raw_os_error(-res)
                );
                case.check(res as usize, &bufs[slot], offs[slot]);
                done += 1;
                if issued < case.ops {
                    offs[slot] = case.offset(issued);
                    issued += 1;
                    push(&mut ring, &mut bufs[slot], offs[slot], slot);
                }
            }
        }
    })
}

/// The tuned floor: the same operations on a ring set up as well as the kernel allows for one
/// thread (`SINGLE_ISSUER | DEFER_TASKRUN`), with the file registered (fixed file 0) and every
/// buffer registered (`READ_FIXED`/`WRITE_FIXED`), completions reaped in place in batches (no
/// allocation). What the reactor's io_uring path could reach at best.
fn tuned_uring_io(path: &Path, case: Case) -> Sample {
    use io_uring::{IoUring, opcode, types};
    let file = std_open(path, case);
    // One aligned region, a block per slot, registered as one buffer each. Declared before the
    // ring, so that the ring goes first even when a check panics.
    let mut region = AlignedBuf::new(BLOCK * case.depth, BLOCK);
    if case.write {
        region.fill(WRITTEN);
    }
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
    let sample = time(Metric::OpsPerSec, case.ops, || {
        let (submitter, mut sq, mut cq) = ring.split();
        let push = |sq: &mut io_uring::SubmissionQueue<'_>, off: u64, slot: usize| {
            // SAFETY: slot's block is not touched until this operation completes.
            let ptr = unsafe { base.add(slot * BLOCK) };
            let (fd, len, idx) = (types::Fixed(0), BLOCK as u32, slot as u16);
            let e = if case.write {
                opcode::WriteFixed::new(fd, ptr, len, idx)
                    .offset(off)
                    .build()
            } else {
                opcode::ReadFixed::new(fd, ptr, len, idx)
                    .offset(off)
                    .build()
            };
            // SAFETY: the block is registered and stays valid until the operation completes.
            unsafe {
                sq.push(&e.user_data(slot as u64))
                    .expect("room: one SQE per slot")
            };
        };
        let (mut issued, mut done) = (0u64, 0u64);
        for (slot, off) in offs.iter_mut().enumerate().take(case.ops as usize) {
            *off = case.offset(issued);
            issued += 1;
            push(&mut sq, *off, slot);
        }
        sq.sync();
        while done < case.ops {
            submitter.submit_and_wait(1).expect("io_uring_enter");
            cq.sync();
            for c in &mut cq {
                let slot = c.user_data() as usize;
                let res = c.result();
                assert!(
                    res >= 0,
                    "tuned I/O: {}",
                    std::io::Error::from_raw_os_error(-res)
                );
                // SAFETY: the operation on slot's block has completed; nothing else writes it.
                let block = unsafe { std::slice::from_raw_parts(base.add(slot * BLOCK), BLOCK) };
                case.check(res as usize, block, offs[slot]);
                done += 1;
                if issued < case.ops {
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
    let (depth, ops) = (case.depth.to_string(), case.ops.to_string());
    let cache = if case.direct { "none" } else { "writeback" };
    let mut args = vec!["-f", "raw", "-i", "io_uring", "-s", "4096", "-t", cache];
    if case.write {
        // Writes, and no flush at the end (the other systems do not flush either).
        args.extend(["-w", "--pattern", "90"]);
    }
    args.extend(["-d", &depth, "-c", &ops]);
    args.push(path.to_str().expect("a UTF-8 path"));
    let took = super::qemu::img_bench(&args);
    Sample::timed(Metric::OpsPerSec, case.ops, took)
}
