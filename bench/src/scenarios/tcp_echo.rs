//! `tcp-echo`: 64 connections over loopback, request/response with 64-byte and 1 KiB messages.
//!
//! The server runs on one thread (a reactor, or a peer runtime); the client is a neutral raw
//! epoll loop on another thread, the same for every server. It keeps one request in flight per
//! connection and checks every echoed byte. Peers: tokio's current_thread runtime, monoio and
//! compio (both io_uring runtimes). Floors: echo servers on the raw kernel interfaces
//! (`echo_floors.rs`): multishot recv into a provided buffer ring on io_uring, and
//! level-triggered epoll.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread;

use reactor::net::SocketIo;
use reactor::{Backend, Reactor};

use crate::measure::{Cpu, Metric, Sample, thread_cpu, time};
use crate::scenarios::{Ctx, Row, System, echo_floors};

/// Connections of the request/response and streaming rows.
const CONNS: usize = 64;
/// Connections of the scalability row, each with one request in flight.
const MANY: usize = 1000;

/// A server: reports its address, serves exactly `conns` connections (echoing until each peer
/// closes), returns its thread's CPU time.
type ServerFn = fn(mpsc::Sender<SocketAddr>, usize) -> Cpu;

pub fn run(ctx: &Ctx) -> Vec<Row> {
    let servers: [(&str, ServerFn); 9] = [
        ("reactor-uring", |tx, conns| {
            reactor_server(Backend::Uring, SocketIo::Completion, tx, conns)
        }),
        ("reactor-uring-multishot", |tx, conns| {
            reactor_server(Backend::Uring, SocketIo::Multishot, tx, conns)
        }),
        ("reactor-uring-readiness", |tx, conns| {
            reactor_server(Backend::Uring, SocketIo::Readiness, tx, conns)
        }),
        ("reactor-epoll", |tx, conns| {
            reactor_server(Backend::Epoll, SocketIo::Readiness, tx, conns)
        }),
        ("tokio", tokio_server),
        ("monoio", monoio_server),
        ("compio", compio_server),
        ("floor-raw-uring", echo_floors::raw_uring),
        ("floor-raw-epoll", echo_floors::raw_epoll),
    ];
    let mut rows = Vec::new();
    raise_fd_limit(2 * MANY as u64 + 100);
    let cases = [
        (
            "tcp-echo-64B",
            64,
            CONNS,
            ctx.scale(400_000, 40_000),
            Metric::OpsPerSec,
        ),
        (
            "tcp-echo-1KiB",
            1024,
            CONNS,
            ctx.scale(400_000, 40_000),
            Metric::OpsPerSec,
        ),
        (
            "tcp-echo-64KiB",
            STREAM,
            CONNS,
            ctx.scale(40_000, 4_000),
            Metric::BytesPerSec,
        ),
        (
            "tcp-echo-1000-conns",
            64,
            MANY,
            ctx.scale(400_000, 40_000),
            Metric::OpsPerSec,
        ),
    ];
    for (scenario, size, conns, n, metric) in cases {
        let systems = servers
            .iter()
            .map(|&(name, server)| {
                System::new(name, move || one_run(server, conns, size, n, metric))
            })
            .collect();
        rows.extend(ctx.interleave(scenario, metric, systems));
    }
    rows
}

/// Raises this process's soft limit of open files towards `want` (up to the hard limit): the
/// scalability row holds both ends of 1,000 connections. A limit too low makes that row fail
/// with `EMFILE`, reported like any failure.
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-parameter.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < want {
        lim.rlim_cur = want.min(lim.rlim_max);
        // SAFETY: as above; raising the soft limit up to the hard one needs no privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// The message size of the streaming row: 64 KiB in flight on each connection, echoed as it
/// arrives (throughput in bytes per second; `cpu/op` is per 64 KiB message).
const STREAM: usize = 64 * 1024;

/// Starts `server` on its own thread, runs the client against it, and joins the server.
fn one_run(server: ServerFn, conns: usize, size: usize, n: u64, metric: Metric) -> Sample {
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || server(tx, conns));
    let addr = rx.recv().expect("the server reports its address");
    let sample = client(addr, conns, size, n, metric);
    let cpu = t.join().expect("server thread");
    sample.with_cpu_of(cpu, n)
}

/// Serves exactly `conns_n` connections, echoing until each peer closes, then returns.
fn reactor_server(
    backend: Backend,
    io: SocketIo,
    tx: mpsc::Sender<SocketAddr>,
    conns_n: usize,
) -> Cpu {
    use reactor::net::TcpListener;
    let r = Reactor::builder()
        .backend(backend)
        .socket_io(io)
        .build()
        .expect("reactor");
    assert_eq!(r.backend(), backend);
    r.block_on(async move {
        let l = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        tx.send(l.local_addr().unwrap()).unwrap();
        let mut conns = Vec::new();
        for _ in 0..conns_n {
            let (s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            conns.push(
                Reactor::with_current(|r| {
                    r.spawn_local(async move {
                        let mut buf = Vec::with_capacity(16 * 1024);
                        loop {
                            let (res, b) = s.read(buf).await;
                            if res.unwrap() == 0 {
                                return;
                            }
                            let (res, b) = s.write_all(b).await;
                            res.unwrap();
                            buf = b;
                        }
                    })
                })
                .unwrap(),
            );
        }
        for c in conns {
            c.await.unwrap();
        }
    });
    thread_cpu()
}

fn tokio_server(tx: mpsc::Sender<SocketAddr>, conns_n: usize) -> Cpu {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tx.send(l.local_addr().unwrap()).unwrap();
        let mut conns = Vec::new();
        for _ in 0..conns_n {
            let (mut s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            conns.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    s.write_all(&buf[..n]).await.unwrap();
                }
            }));
        }
        for c in conns {
            c.await.unwrap();
        }
    });
    thread_cpu()
}

fn monoio_server(tx: mpsc::Sender<SocketAddr>, conns_n: usize) -> Cpu {
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .build()
        .expect("monoio runtime");
    rt.block_on(async move {
        let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        tx.send(l.local_addr().unwrap()).unwrap();
        let mut conns = Vec::new();
        for _ in 0..conns_n {
            let (mut s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            conns.push(monoio::spawn(async move {
                let mut buf = Vec::with_capacity(16 * 1024);
                loop {
                    let (res, b) = s.read(buf).await;
                    if res.unwrap() == 0 {
                        return;
                    }
                    let (res, b) = s.write_all(b).await;
                    res.unwrap();
                    buf = b;
                    buf.clear();
                }
            }));
        }
        for c in conns {
            c.await;
        }
    });
    thread_cpu()
}

fn compio_server(tx: mpsc::Sender<SocketAddr>, conns_n: usize) -> Cpu {
    use compio::io::{AsyncRead, AsyncWriteExt};
    let rt = compio::runtime::Runtime::new().expect("compio runtime");
    rt.block_on(async move {
        let l = compio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tx.send(l.local_addr().unwrap()).unwrap();
        let mut conns = Vec::new();
        for _ in 0..conns_n {
            let (mut s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            conns.push(compio::runtime::spawn(async move {
                let mut buf = Vec::with_capacity(16 * 1024);
                loop {
                    let compio::BufResult(res, b) = s.read(buf).await;
                    if res.unwrap() == 0 {
                        return;
                    }
                    let compio::BufResult(res, b) = s.write_all(b).await;
                    res.unwrap();
                    buf = b;
                    buf.clear();
                }
            }));
        }
        for c in conns {
            let _ = c.await;
        }
    });
    thread_cpu()
}

/// One connection of the client: the request in flight and how much of its echo came back.
struct Conn {
    s: std::net::TcpStream,
    seq: u64,
    got: usize,
    buf: Vec<u8>,
}

fn fill(req: &mut [u8], conn: usize, seq: u64) {
    for (i, b) in req.iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(conn * 7 + i) as u8;
    }
}

fn send_all(s: &std::net::TcpStream, mut data: &[u8]) {
    use std::io::Write;
    while !data.is_empty() {
        match (&*s).write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) => panic!("client write: {e}"),
        }
    }
}

/// The neutral client: `conns_n` connections, one `size`-byte request in flight on each, until
/// `n` requests have been echoed; every byte is checked. `metric` counts requests, or bytes.
fn client(addr: SocketAddr, conns_n: usize, size: usize, n: u64, metric: Metric) -> Sample {
    use std::io::Read;
    let mut conns: Vec<Conn> = (0..conns_n)
        .map(|_| {
            let s = std::net::TcpStream::connect(addr).expect("connect");
            s.set_nodelay(true).unwrap();
            s.set_nonblocking(true).unwrap();
            Conn {
                s,
                seq: 0,
                got: 0,
                buf: vec![0; size],
            }
        })
        .collect();
    // SAFETY: plain epoll calls on fds owned by this function.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0);
    for (i, c) in conns.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: epoll_ctl on live fds with a valid event the kernel copies.
        let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c.s.as_raw_fd(), &mut ev) };
        assert_eq!(rc, 0);
    }
    let mut req = vec![0u8; size];
    let mut expect = vec![0u8; size];
    let mut done = 0u64;
    let mut sent = 0u64;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; conns_n];
    let units = if metric == Metric::BytesPerSec {
        n * size as u64
    } else {
        n
    };
    let sample = time(metric, units, || {
        for (i, c) in conns.iter_mut().enumerate() {
            fill(&mut req, i, c.seq);
            send_all(&c.s, &req);
            sent += 1;
        }
        while done < n {
            // SAFETY: `events` has room for `conns_n` entries.
            let k = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), conns_n as i32, 10_000) };
            assert!(k > 0, "the server stopped answering");
            for ev in &events[..k as usize] {
                let i = ev.u64 as usize;
                let c = &mut conns[i];
                loop {
                    match c.s.read(&mut c.buf[c.got..]) {
                        Ok(0) => panic!("server closed connection {i}"),
                        Ok(m) => c.got += m,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("client read: {e}"),
                    }
                    if c.got == size {
                        fill(&mut expect, i, c.seq);
                        assert_eq!(c.buf, expect, "echo of request {} on connection {i}", c.seq);
                        done += 1;
                        c.got = 0;
                        c.seq += 1;
                        if sent < n {
                            fill(&mut req, i, c.seq);
                            send_all(&c.s, &req);
                            sent += 1;
                        }
                    }
                }
            }
        }
    });
    assert_eq!(done, n);
    // SAFETY: closing the epoll fd this function created.
    unsafe { libc::close(ep) };
    drop(conns); // the server sees EOF on every connection and returns
    sample
}
