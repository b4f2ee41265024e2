//! Rings of 128-byte SQEs (`Builder::sqe128`) and `submit_sqe128`: `URING_CMD` with an 80-byte
//! command, next to every ordinary operation on the same ring.

use std::cell::Cell;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use reactor::io_uring::{opcode, types};
use reactor::{Backend, Completion, Reactor};
use tests::backend_tests;

/// `SOCKET_URING_OP_SIOCINQ` (Linux 6.7): a socket's unread bytes, as the `SIOCINQ` ioctl.
const SOCKET_URING_OP_SIOCINQ: u32 = 0;
/// `SOCKET_URING_OP_SIOCOUTQ`: a socket's unsent bytes.
const SOCKET_URING_OP_SIOCOUTQ: u32 = 1;

/// A connected TCP pair on loopback (socket commands need a protocol with ioctls: not Unix
/// sockets, which answer `EOPNOTSUPP`).
fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Bytes waiting on `s`.
fn peek_len(s: &std::net::TcpStream) -> usize {
    let mut buf = [0u8; 16];
    s.set_nonblocking(true).unwrap();
    let n = s.peek(&mut buf).unwrap_or(0);
    s.set_nonblocking(false).unwrap();
    n
}

/// A reactor like `r` (same backend) whose ring, on io_uring, takes 128-byte SQEs.
fn sqe128_like(r: &Reactor) -> Reactor {
    let big = Reactor::builder()
        .backend(r.backend())
        .sqe128(true)
        .build()
        .unwrap_or_else(|e| panic!("the {} backend with sqe128: {e}", r.backend()));
    assert_eq!(big.backend(), r.backend());
    big
}

/// Submits `sqe` with `submit_sqe128` and runs `r` until it completes.
fn run128(r: &Reactor, sqe: reactor::io_uring::squeue::Entry128) -> Completion {
    let got = Rc::new(Cell::new(None));
    let g = got.clone();
    // SAFETY: the callers' commands refer to no memory, and their fds outlive the loop below.
    unsafe { r.submit_sqe128(sqe, move |_, c| g.set(Some(c))) }.unwrap();
    r.run_until(|| got.get().is_some());
    got.get().unwrap()
}

backend_tests! {
    fn a_sqe128_ring_runs_uring_cmd_and_every_other_operation(r: &Reactor) {
        let big = sqe128_like(r);
        let (a, b) = tcp_pair();
        (&b).write_all(b"hello").unwrap();
        // (The bytes are on `a`'s side once loopback has carried them.)
        let t0 = std::time::Instant::now();
        while peek_len(&a) < 5 && t0.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::yield_now();
        }
        let inq = opcode::UringCmd80::new(types::Fd(a.as_raw_fd()), SOCKET_URING_OP_SIOCINQ);
        if r.backend() != Backend::Uring {
            assert!(!big.sqe128(), "epoll has no ring");
            // SAFETY: never submitted.
            let e = unsafe { big.submit_sqe128(inq.build(), |_, _| {}) }.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
            assert_eq!(big.ops_in_flight(), 0, "the callback was not kept");
            return;
        }
        assert!(big.sqe128());
        assert!(!r.sqe128(), "a ring takes 64-byte SQEs unless asked");
        assert_eq!(run128(&big, inq.build()), Completion { result: 5, flags: 0 });
        let outq = opcode::UringCmd80::new(types::Fd(b.as_raw_fd()), SOCKET_URING_OP_SIOCOUTQ);
        assert!(run128(&big, outq.build()).result >= 0);
        // A command on what is not a socket: the kernel's error comes back as the result.
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let bad = opcode::UringCmd80::new(types::Fd(f.as_raw_fd()), SOCKET_URING_OP_SIOCINQ);
        assert!(run128(&big, bad.build()).result < 0);
        // A 64-byte SQE on the same ring, and the runtime's own operations (a file read and
        // a socket receive through the ring).
        let got = Rc::new(Cell::new(None));
        let g = got.clone();
        // SAFETY: a NOP refers to no memory.
        unsafe { big.submit_sqe(opcode::Nop::new().build(), move |_, c| g.set(Some(c.result))) }
            .unwrap();
        big.run_until(|| got.get().is_some());
        assert_eq!(got.get(), Some(0));
        let path = std::env::temp_dir().join(format!("sqe128-{}", std::process::id()));
        std::fs::write(&path, b"0123456789").unwrap();
        let file = reactor::fs::File::from_std(std::fs::File::open(&path).unwrap());
        let (res, buf) = big.block_on(file.read_at(vec![0u8; 4], 3));
        assert_eq!((res.unwrap(), &buf[..]), (4, &b"3456"[..]));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(big.ops_in_flight(), 0);
    }

    fn a_64_byte_ring_refuses_128_byte_sqes_with_a_clear_error(r: &Reactor) {
        let (a, _b) = tcp_pair();
        let inq = opcode::UringCmd80::new(types::Fd(a.as_raw_fd()), SOCKET_URING_OP_SIOCINQ);
        let kept = Rc::new(());
        let k = kept.clone();
        // SAFETY: refused before it reaches the ring.
        let e = unsafe { r.submit_sqe128(inq.build(), move |_, _| assert!(Rc::strong_count(&k) > 0)) }.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("Builder::sqe128"), "{e}");
        assert_eq!(Rc::strong_count(&kept), 1, "the refused callback was dropped");
        assert_eq!(r.ops_in_flight(), 0);
    }

    fn a_sqe128_command_is_cancelled_and_its_callback_dropped_with_the_reactor(r: &Reactor) {
        if r.backend() != Backend::Uring {
            assert!(!sqe128_like(r).sqe128());
            return;
        }
        // A receive that never completes, on the big ring: the reactor's drop cancels it and
        // drops its callback (with what it owns) once the kernel has let go.
        let big = sqe128_like(r);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let buf = Rc::new(std::cell::RefCell::new(vec![0u8; 64]));
        let b2 = buf.clone();
        let ptr = buf.borrow_mut().as_mut_ptr();
        let recv = opcode::Recv::new(types::Fd(a.as_raw_fd()), ptr, 64).build();
        let recv128: reactor::io_uring::squeue::Entry128 = recv.into();
        // SAFETY: the buffer lives in the callback's captures until the last completion.
        unsafe { big.submit_sqe128(recv128, move |_, _| assert!(!b2.borrow().is_empty())) }.unwrap();
        big.poll(false);
        assert_eq!(big.ops_in_flight(), 1);
        assert_eq!(Rc::strong_count(&buf), 2);
        drop(big);
        assert_eq!(Rc::strong_count(&buf), 1, "the callback went with the reactor");
    }
}
