//! The floors of the `tcp-echo` rows: echo servers written straight on the kernel interface,
//! with no runtime, serving the same connections as every other server.
//!
//! - `floor-raw-epoll`: level-triggered epoll; per ready connection one `read` and one `write`
//!   (what readiness costs at the least: a wait per batch, two system calls per request).
//! - `floor-raw-uring`: a tuned ring (`SINGLE_ISSUER`, `DEFER_TASKRUN`, registered ring fd);
//!   multishot accept; one multishot recv per connection for its lifetime, into a provided
//!   buffer ring; the echo sent straight from the buffer it arrived in, which goes back to the
//!   ring when the send completes; every SQE of a loop iteration submitted by the one
//!   `io_uring_enter` that also waits (one system call per batch, none per request).

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::measure::{Cpu, thread_cpu};

fn listener(tx: &mpsc::Sender<SocketAddr>) -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    tx.send(l.local_addr().unwrap()).unwrap();
    l
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: `one` outlives the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_NODELAY: {}", std::io::Error::last_os_error());
}

/// The raw epoll echo server. Returns its thread's CPU time.
pub fn raw_epoll(tx: mpsc::Sender<SocketAddr>, conns: usize) -> Cpu {
    let l = listener(&tx);
    // SAFETY: plain epoll calls on fds owned by this function.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0);
    let mut fds = Vec::with_capacity(conns);
    for i in 0..conns {
        let (s, _) = l.accept().expect("accept");
        s.set_nodelay(true).unwrap();
        let fd = s.into_raw_fd();
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: epoll_ctl on live fds with a valid event the kernel copies.
        let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        assert_eq!(rc, 0);
        fds.push(fd);
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; conns];
    let mut open = conns;
    while open > 0 {
        // SAFETY: `events` has room for `conns` entries.
        let k = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), conns as i32, -1) };
        if k < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        assert!(k >= 0, "epoll_wait: {}", std::io::Error::last_os_error());
        for ev in &events[..k as usize] {
            let fd = fds[ev.u64 as usize];
            // One read per readiness: level-triggered epoll reports what is left next time.
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                // SAFETY: closing a connection this function accepted (which also removes it
                // from the epoll set).
                unsafe { libc::close(fd) };
                open -= 1;
                continue;
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "read: {e}");
                continue;
            }
            write_all_blocking(fd, &buf[..n as usize]);
        }
    }
    // SAFETY: closing the epoll fd this function created.
    unsafe { libc::close(ep) };
    thread_cpu()
}

/// Writes all of `data` to a blocking socket (loopback takes it at once: one call).
fn write_all_blocking(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: `data` is readable for its length.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "write: {e}");
            continue;
        }
        data = &data[n as usize..];
    }
}

/// Buffers in the provided buffer ring (a power of two), and the size of each.
const BUFS: u16 = 2048;
const BUF_SIZE: usize = 4096;
/// The buffer group of the ring.
const BGID: u16 = 7;

/// `user_data` of the multishot accept; the others carry their connection in the low bits.
const ACCEPT: u64 = 1 << 32;
const RECV: u64 = 2 << 32;
const SEND: u64 = 3 << 32;

/// A provided buffer ring: the entries the kernel picks buffers from, and the buffers.
struct BufRing {
    entries: *mut types::BufRingEntry,
    layout: std::alloc::Layout,
    bufs: Vec<u8>,
    /// Our copy of the tail; published to the kernel by [`publish`](Self::publish).
    tail: u16,
}

impl BufRing {
    fn new(submitter: &io_uring::Submitter<'_>) -> BufRing {
        let layout =
            std::alloc::Layout::from_size_align(usize::from(BUFS) * 16, 4096).expect("layout");
        // SAFETY: a non-zero size; zeroed, so that the tail (in entry 0) starts at 0.
        let entries = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        assert!(!entries.is_null(), "out of memory");
        let mut ring = BufRing {
            entries,
            layout,
            bufs: vec![0u8; usize::from(BUFS) * BUF_SIZE],
            tail: 0,
        };
        // SAFETY: the entries stay allocated until after the ring is unregistered (drop order
        // in `raw_uring`), page-aligned, `BUFS` long.
        unsafe { submitter.register_buf_ring_with_flags(entries as u64, BUFS, BGID, 0) }
            .expect("IORING_REGISTER_PBUF_RING (Linux 5.19)");
        for bid in 0..BUFS {
            ring.give(bid);
        }
        ring.publish();
        ring
    }

    /// Buffer `bid`'s memory.
    fn buf(&self, bid: u16) -> *const u8 {
        self.bufs[usize::from(bid) * BUF_SIZE..].as_ptr()
    }

    /// Hands buffer `bid` back to the kernel (seen at the next `publish`).
    fn give(&mut self, bid: u16) {
        let i = usize::from(self.tail & (BUFS - 1));
        // SAFETY: `i` is within the ring; the setters leave the `resv` field (the tail, in
        // entry 0) alone.
        let e = unsafe { &mut *self.entries.add(i) };
        e.set_addr(self.buf(bid) as u64);
        e.set_len(BUF_SIZE as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the entries given so far.
    fn publish(&self) {
        // SAFETY: the tail field of a ring whose entry 0 is initialised (zeroed at least).
        let tail = unsafe { types::BufRingEntry::tail(self.entries) }.cast_mut();
        // SAFETY: a u16 in memory the kernel reads concurrently, accessed atomically.
        let tail = unsafe { AtomicU16::from_ptr(tail) };
        // Release: the entries written before are visible to the kernel once it reads the tail.
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the ring was unregistered before.
        unsafe { std::alloc::dealloc(self.entries.cast(), self.layout) };
    }
}

/// A connection of the raw io_uring server.
struct Conn {
    fd: RawFd,
    /// Received data not yet echoed: (buffer, offset, end), oldest first.
    out: VecDeque<(u16, usize, usize)>,
    /// A send is in flight (one at a time, so that the echo keeps its order).
    sending: bool,
    eof: bool,
}

/// The raw io_uring echo server. Returns its thread's CPU time.
pub fn raw_uring(tx: mpsc::Sender<SocketAddr>, n_conns: usize) -> Cpu {
    let l = listener(&tx);
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(1024)
        .build(256)
        .expect("an io_uring");
    let (mut submitter, mut sq, mut cq) = ring.split();
    submitter
        .register_ring_fd()
        .expect("IORING_REGISTER_RING_FDS (Linux 5.18)");
    let mut bufs = BufRing::new(&submitter);
    let mut conns: Vec<Conn> = Vec::with_capacity(n_conns);
    let mut closed = 0;
    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
    let mut pending: Vec<squeue::Entry> = Vec::with_capacity(256);
    let accept = opcode::AcceptMulti::new(types::Fd(l.as_raw_fd()))
        .build()
        .user_data(ACCEPT);
    pending.push(accept.clone());
    while closed < n_conns {
        for e in pending.drain(..) {
            // SAFETY: every SQE refers to a socket this function owns and, for sends, to a
            // buffer that stays out of the buffer ring until the send completes.
            while unsafe { sq.push(&e) }.is_err() {
                sq.sync();
                submitter.submit().expect("io_uring_enter");
                sq.sync();
            }
        }
        sq.sync();
        match submitter.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => panic!("io_uring_enter: {e}"),
        }
        cq.sync();
        cqes.extend((&mut cq).map(|c| (c.user_data(), c.result(), c.flags())));
        for (data, res, flags) in cqes.drain(..) {
            let idx = (data & 0xffff_ffff) as usize;
            match data & !0xffff_ffff {
                ACCEPT => {
                    assert!(
                        res >= 0,
                        "accept: {}",
                        std::io::Error::from_raw_os_error(-res)
                    );
                    set_nodelay(res);
                    conns.push(Conn {
                        fd: res,
                        out: VecDeque::new(),
                        sending: false,
                        eof: false,
                    });
                    pending.push(recv(res, conns.len() - 1));
                    if !cqueue::more(flags) && conns.len() < n_conns {
                        pending.push(accept.clone());
                    }
                }
                RECV => {
                    let c = &mut conns[idx];
                    if res == -libc::ENOBUFS {
                        // Every buffer is out (held by sends in flight): arm again; the sends
                        // that complete return theirs.
                        pending.push(recv(c.fd, idx));
                        continue;
                    }
                    assert!(
                        res >= 0,
                        "recv: {}",
                        std::io::Error::from_raw_os_error(-res)
                    );
                    if res == 0 {
                        c.eof = true;
                    } else {
                        let bid = cqueue::buffer_select(flags).expect("a provided buffer");
                        c.out.push_back((bid, 0, res as usize));
                        if !cqueue::more(flags) {
                            pending.push(recv(c.fd, idx));
                        }
                        if !c.sending {
                            c.sending = true;
                            pending.push(send(&bufs, c, idx));
                        }
                    }
                }
                SEND => {
                    assert!(
                        res >= 0,
                        "send: {}",
                        std::io::Error::from_raw_os_error(-res)
                    );
                    let c = &mut conns[idx];
                    let head = c.out.front_mut().expect("a send in flight");
                    head.1 += res as usize;
                    if head.1 == head.2 {
                        bufs.give(head.0);
                        c.out.pop_front();
                    }
                    if c.out.is_empty() {
                        c.sending = false;
                    } else {
                        pending.push(send(&bufs, c, idx));
                    }
                }
                other => panic!("unexpected completion {other:#x}"),
            }
            let c = conns.get(idx);
            if data & !0xffff_ffff != ACCEPT && c.is_some_and(|c| c.eof && !c.sending) {
                let c = &mut conns[idx];
                // SAFETY: closing a connection this function accepted, with nothing in flight
                // on it (its recv ended with the EOF, its sends are done).
                unsafe { libc::close(c.fd) };
                c.fd = -1;
                c.eof = false;
                closed += 1;
            }
        }
        bufs.publish();
    }
    submitter
        .unregister_buf_ring(BGID)
        .expect("IORING_UNREGISTER_PBUF_RING");
    drop(bufs);
    thread_cpu()
}

/// A multishot recv on connection `idx` into the buffer ring.
fn recv(fd: RawFd, idx: usize) -> squeue::Entry {
    opcode::RecvMulti::new(types::Fd(fd), BGID)
        .build()
        .user_data(RECV | idx as u64)
}

/// A send of the oldest unsent data of connection `idx`, straight from its buffer.
fn send(bufs: &BufRing, c: &Conn, idx: usize) -> squeue::Entry {
    let (bid, off, end) = *c.out.front().expect("data to send");
    // SAFETY: `off..end` lies within buffer `bid`.
    let p = unsafe { bufs.buf(bid).add(off) };
    opcode::Send::new(types::Fd(c.fd), p, (end - off) as u32)
        .build()
        .user_data(SEND | idx as u64)
}
