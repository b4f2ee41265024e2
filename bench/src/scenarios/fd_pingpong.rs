//! `fd-pingpong`: one byte bounced over a socketpair between two threads, through the
//! reactor's fd handlers (round-trip ns); tokio with its `UnixStream`s; the floor is two
//! threads doing blocking `read`/`write` on the same kind of socketpair.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::thread;

use reactor::{Backend, FdHandler, PollParams, Reactor};

use crate::measure::{Metric, Sample, time};
use crate::scenarios::{Ctx, Row, System};

pub fn run(ctx: &Ctx) -> Vec<Row> {
    let n = ctx.scale(20_000, 2_000);
    let mut systems: Vec<System> = [Backend::Uring, Backend::Epoll]
        .into_iter()
        .map(|b| {
            System::new(format!("reactor-{b}"), move || {
                reactor_side(b, PollParams::OFF, n)
            })
        })
        .collect();
    systems.push(System::new("tokio", move || tokio_side(n)));
    systems.push(System::new("floor-blocking-rw", move || floor(n)));
    let mut rows = ctx.interleave_counting_syscalls("fd-pingpong", Metric::NsPerOp, systems);
    // With adaptive polling: on io_uring, the POLL_ADD completion lands in the ring, which the
    // spin sees without a system call; on epoll only a system call could see the fd, so the
    // spin helps only through the notifier (nothing here), and the row shows that.
    let np = ctx.scale(100_000, 10_000);
    let systems = [Backend::Uring, Backend::Epoll]
        .into_iter()
        .map(|b| {
            System::new(format!("reactor-{b}"), move || {
                reactor_side(b, crate::scenarios::pingpong::POLL, np)
            })
        })
        .collect();
    rows.extend(ctx.interleave_counting_syscalls("fd-pingpong-poll", Metric::NsPerOp, systems));
    rows
}

/// An fd handler that answers each byte with a byte, `n` times, then returns the count.
fn echo_with_handlers(r: &Reactor, s: UnixStream, n: u64, start: bool) -> u64 {
    s.set_nonblocking(true).unwrap();
    let count = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let c2 = count.clone();
    let fd = s.as_raw_fd();
    if start {
        (&s).write_all(b"x").unwrap();
    }
    r.add_fd(
        fd,
        FdHandler::new().on_read(move |r, id| {
            let mut b = [0u8; 1];
            match (&s).read(&mut b) {
                Ok(1) => {}
                Ok(_) => {
                    r.remove_fd(id).unwrap();
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => panic!("fd-pingpong read: {e}"),
            }
            c2.set(c2.get() + 1);
            if c2.get() < n || !start {
                (&s).write_all(&b).unwrap();
            }
        }),
    )
    .unwrap();
    r.run_until(|| count.get() >= n);
    count.get()
}

fn reactor_side(backend: Backend, poll: PollParams, n: u64) -> Sample {
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || {
        let r = Reactor::builder()
            .backend(backend)
            .poll(poll)
            .build()
            .unwrap();
        echo_with_handlers(&r, b, n, false)
    });
    let r = Reactor::builder()
        .backend(backend)
        .poll(poll)
        .build()
        .unwrap();
    assert_eq!(r.backend(), backend);
    let mut got = 0;
    let s = time(Metric::NsPerOp, n, || {
        got = echo_with_handlers(&r, a, n, true)
    });
    assert_eq!(got, n);
    assert_eq!(t.join().unwrap(), n);
    s
}

fn tokio_side(n: u64) -> Sample {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let t = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut b = tokio::net::UnixStream::from_std(b).unwrap();
            let mut x = [0u8; 1];
            for _ in 0..n {
                b.read_exact(&mut x).await.unwrap();
                b.write_all(&x).await.unwrap();
            }
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = time(Metric::NsPerOp, n, || {
        rt.block_on(async {
            let mut a = tokio::net::UnixStream::from_std(a).unwrap();
            let mut x = [7u8; 1];
            for _ in 0..n {
                a.write_all(&x).await.unwrap();
                a.read_exact(&mut x).await.unwrap();
                assert_eq!(x, [7]);
            }
        })
    });
    t.join().unwrap();
    s
}

fn floor(n: u64) -> Sample {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || {
        let mut x = [0u8; 1];
        for _ in 0..n {
            b.read_exact(&mut x).unwrap();
            b.write_all(&x).unwrap();
        }
    });
    let s = time(Metric::NsPerOp, n, || {
        let mut x = [9u8; 1];
        for _ in 0..n {
            a.write_all(&x).unwrap();
            a.read_exact(&mut x).unwrap();
            assert_eq!(x, [9]);
        }
    });
    t.join().unwrap();
    s
}
