//! Sockets: TCP and Unix echo with 100 concurrent connections, every byte checked; both
//! socket I/O modes on io_uring; futures-io traits; errors.

use std::net::SocketAddr;
use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
#[cfg(feature = "uring")]
use reactor::net::SocketIo;
use reactor::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use reactor::{JoinHandle, Reactor};
use tests::backend_tests;

const CONNS: usize = 100;
const BYTES: usize = 64 * 1024;

fn pattern(conn: usize) -> Vec<u8> {
    (0..BYTES)
        .map(|i| ((i * 31 + conn * 7) % 256) as u8)
        .collect()
}

fn spawn<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> JoinHandle<T> {
    Reactor::with_current(|r| r.spawn_local(f)).expect("inside the reactor")
}

macro_rules! echo_loop {
    ($s:expr) => {{
        let s = $s;
        let mut buf = Vec::with_capacity(8192);
        loop {
            let (res, b) = s.read(buf).await;
            let n = res.expect("server read");
            if n == 0 {
                break;
            }
            let (res, b) = s.write_all(b).await;
            res.expect("server write");
            buf = b;
        }
    }};
}

macro_rules! client {
    ($s:expr, $conn:expr) => {{
        let s = $s;
        let data = pattern($conn);
        let writer = {
            let data = data.clone();
            let s = s.clone();
            spawn(async move {
                for chunk in data.chunks(1000 + $conn * 13) {
                    let (res, _) = s.write_all(chunk.to_vec()).await;
                    res.expect("client write");
                }
                s.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let mut got = Vec::with_capacity(BYTES);
        while got.len() < BYTES {
            let (res, b) = s.read(Vec::with_capacity(4096)).await;
            let n = res.expect("client read");
            assert!(n > 0, "early EOF on connection {}", $conn);
            got.extend_from_slice(&b);
        }
        let (res, _) = s.read(Vec::with_capacity(16)).await;
        assert_eq!(res.unwrap(), 0, "EOF after the echo");
        writer.await.unwrap();
        assert_eq!(got, data, "connection {} echoed every byte", $conn);
    }};
}

fn tcp_echo(r: &Reactor) {
    r.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr: SocketAddr = l.local_addr().unwrap();
        let server = spawn(async move {
            let mut conns = Vec::new();
            for _ in 0..CONNS {
                let (s, _) = l.accept().await.unwrap();
                conns.push(spawn(async move { echo_loop!(s) }));
            }
            for c in conns {
                c.await.unwrap();
            }
        });
        let clients: Vec<_> = (0..CONNS)
            .map(|i| {
                spawn(async move {
                    let s = Rc::new(TcpStream::connect(addr).await.unwrap());
                    s.set_nodelay(true).unwrap();
                    client!(s, i)
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        server.await.unwrap();
    });
}

fn unix_echo(r: &Reactor, tag: &str) {
    let path = std::env::temp_dir().join(format!(
        "reactor-echo-{tag}-{}-{}",
        r.backend(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let p2 = path.clone();
    r.block_on(async move {
        let l = UnixListener::bind(&p2).unwrap();
        let server = spawn(async move {
            let mut conns = Vec::new();
            for _ in 0..CONNS {
                let s = l.accept().await.unwrap();
                conns.push(spawn(async move { echo_loop!(s) }));
            }
            for c in conns {
                c.await.unwrap();
            }
        });
        let clients: Vec<_> = (0..CONNS)
            .map(|i| {
                let p = p2.clone();
                spawn(async move {
                    let s = Rc::new(UnixStream::connect(&p).await.unwrap());
                    client!(s, i)
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        server.await.unwrap();
    });
    std::fs::remove_file(&path).unwrap();
}

#[cfg(feature = "uring")]
fn readiness_reactor() -> Reactor {
    let r = Reactor::builder()
        .backend(reactor::Backend::Uring)
        .socket_io(SocketIo::Readiness)
        .build()
        .unwrap();
    assert_eq!(r.socket_io(), SocketIo::Readiness);
    r
}

backend_tests! {
    fn tcp_echo_100_connections(r: &Reactor) {
        tcp_echo(r);
    }

    fn tcp_echo_100_connections_with_multishot(r: &Reactor) {
        // 100 streams, each allowed 8 buffers of the ring's 512: the ring runs out on the way.
        tcp_echo(&tests::multishot_on(r.backend()));
    }

    fn unix_echo_100_connections_with_multishot(r: &Reactor) {
        unix_echo(&tests::multishot_on(r.backend()), "multishot");
    }

    fn unix_echo_100_connections(r: &Reactor) {
        unix_echo(r, "default");
    }

    fn futures_io_traits(r: &Reactor) {
        r.block_on(async {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let writer = spawn(async move {
                AsyncWriteExt::write_all(&mut a, &pattern(3)).await.unwrap();
                a.close().await.unwrap();
            });
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, pattern(3));
            writer.await.unwrap();
        });
    }

    fn connect_refused(r: &Reactor) {
        r.block_on(async {
            // Bind then drop a listener, so the port is (almost certainly) closed.
            let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
            let e = TcpStream::connect(addr).await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        });
    }

    fn write_to_a_closed_peer_is_an_error_not_a_signal(r: &Reactor) {
        r.block_on(async {
            let (a, b) = UnixStream::pair().unwrap();
            drop(b);
            let (res, _) = a.write_all(vec![0u8; 1 << 20]).await;
            assert_eq!(res.unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
        });
    }

    fn a_connection_moves_between_reactors_through_std(r: &Reactor) {
        // Accept on this reactor, hand the socket to a reactor on another thread as a std
        // socket (what a server spreading connections over IoThreads does), echo there.
        let backend = r.backend();
        let (addr, accepted) = r.block_on(async {
            let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let l = TcpListener::from_std(std_l).unwrap();
            let addr = l.local_addr().unwrap();
            let client = std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                c.write_all(b"across threads").unwrap();
                let mut back = [0u8; 14];
                c.read_exact(&mut back).unwrap();
                back
            });
            let (s, peer) = l.accept_std().await.unwrap();
            assert_eq!(peer, s.peer_addr().unwrap());
            // SAFETY: F_GETFL on an open fd.
            let fl = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&s), libc::F_GETFL) };
            assert_ne!(fl & libc::O_NONBLOCK, 0, "accepted sockets are non-blocking");
            (client, s)
        });
        let (client, std_s) = (addr, accepted);
        let other = std::thread::spawn(move || {
            let r2 = tests::reactor_on(backend);
            r2.block_on(async {
                let s = TcpStream::from_std(std_s).unwrap();
                let (res, buf) = s.read(Vec::with_capacity(64)).await;
                assert_eq!(res.unwrap(), 14);
                let (res, _) = s.write_all(buf).await;
                res.unwrap();
            });
        });
        other.join().unwrap();
        assert_eq!(&client.join().unwrap(), b"across threads");
    }

    fn into_std_waits_for_a_cancelled_operation(r: &Reactor) {
        r.block_on(async {
            let (a, d) = UnixStream::pair().unwrap();
            let a = Rc::new(a);
            let a2 = a.clone();
            let reader = spawn(async move { a2.read(Vec::with_capacity(8)).await.0.map(drop) });
            tests::yield_now().await;
            // Drop the read while it is in flight (on io_uring its cancellation is pending and
            // its completion still holds the socket), then convert at once.
            reader.abort();
            assert!(reader.await.unwrap_err().is_cancelled());
            let a = Rc::try_unwrap(a).expect("the task and its future are gone");
            let a = a.into_std().await.unwrap();
            use std::io::Write;
            (&a).write_all(b"x").unwrap();
            let (res, got) = d.read(Vec::with_capacity(1)).await;
            assert_eq!((res.unwrap(), &got[..]), (1, &b"x"[..]));
        });
    }

    fn unix_listener_from_std(r: &Reactor) {
        let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("from-std-{}-{}.sock", r.backend(), std::process::id()));
        let _ = std::fs::remove_file(&path);
        r.block_on(async {
            let l = UnixListener::from_std(std::os::unix::net::UnixListener::bind(&path).unwrap()).unwrap();
            let p2 = path.clone();
            let client = spawn(async move {
                let c = UnixStream::connect(&p2).await.unwrap();
                c.write_all(b"hi".to_vec()).await.0.unwrap();
            });
            let s = l.accept().await.unwrap();
            let (res, got) = s.read(Vec::with_capacity(2)).await;
            assert_eq!((res.unwrap(), &got[..]), (2, &b"hi"[..]));
            client.await.unwrap();
        });
        std::fs::remove_file(&path).unwrap();
    }

    fn sockets_outside_a_reactor_fail_cleanly(r: &Reactor) {
        let _ = r;
        let e = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("no reactor"), "{e}");
    }
}

/// The default on io_uring is completion operations; these run the same echoes with the
/// readiness path that io_uring can also use.
#[cfg(feature = "uring")]
mod uring_readiness {
    use super::*;

    #[test]
    fn tcp_echo_100_connections_with_readiness() {
        tcp_echo(&readiness_reactor());
    }

    #[test]
    fn unix_echo_100_connections_with_readiness() {
        unix_echo(&readiness_reactor(), "readiness");
    }

    #[test]
    fn connect_refused_with_readiness() {
        let r = readiness_reactor();
        r.block_on(async {
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let e = TcpStream::connect(addr).await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        });
    }

    #[test]
    fn the_default_on_io_uring_is_completion() {
        let r = tests::reactor_on(reactor::Backend::Uring);
        assert_eq!(r.socket_io(), SocketIo::Completion);
    }
}
