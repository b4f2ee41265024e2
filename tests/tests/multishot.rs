//! Multishot receives (`SocketIo::Multishot`): a peer faster than the reader, a ring with every
//! buffer held, streams dropped with data held, conversion to `std`. On epoll the same reactor
//! setting means readiness, and the same bytes must arrive.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reactor::net::{TcpListener, TcpStream};
use reactor::{Backend, Reactor};
use tests::backend_tests;

/// The most buffers of the receive ring one stream may hold once the loop has reaped: its share
/// of 8, whatever the scheduler did meanwhile (what the kernel delivers beyond it is copied out
/// of the ring).
const STREAM_BOUND: u64 = 8;

fn data(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 7 + seed * 13) % 251) as u8).collect()
}

/// `n` loopback connections: the std client sides, and the listener's reactor streams.
async fn connections(n: usize) -> (Vec<std::net::TcpStream>, Vec<TcpStream>) {
    let l = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..n {
        clients.push(std::net::TcpStream::connect(addr).unwrap());
        servers.push(l.accept().await.unwrap().0);
    }
    (clients, servers)
}

/// Reads `s` to EOF in reads of at most `chunk` bytes.
async fn read_to_end(s: &TcpStream, chunk: usize) -> Vec<u8> {
    let mut got = Vec::new();
    loop {
        let (res, b) = s.read(Vec::with_capacity(chunk)).await;
        if res.unwrap() == 0 {
            return got;
        }
        got.extend_from_slice(&b);
    }
}

/// Lets the reactor receive for a while without the application reading.
async fn let_it_receive() {
    reactor::time::sleep(Duration::from_millis(100)).await;
}

backend_tests! {
    fn a_fast_sender_and_a_slow_reader_lose_nothing_and_hold_a_bounded_share(r: &Reactor) {
        let r = tests::multishot_on(r.backend());
        let sent = data(8 << 20, 1);
        r.block_on(async {
            let (mut clients, servers) = connections(2).await;
            let (fast, other) = (clients.remove(0), clients.remove(0));
            let s = &servers[0];
            // Arm the receive (reading the first byte), then stop reading while the peer sends
            // 8 MiB (more than the whole ring holds).
            let writer = {
                let sent = sent.clone();
                std::thread::spawn(move || {
                    let mut fast = fast;
                    fast.write_all(&b"x"[..]).unwrap();
                    fast.write_all(&sent).unwrap();
                })
            };
            let (res, first) = s.read(Vec::with_capacity(1)).await;
            assert_eq!((res.unwrap(), &first[..]), (1, &b"x"[..]));
            let_it_receive().await;
            let held = Reactor::with_current(|r| r.stats().recv_buffers_held).unwrap();
            assert!(held <= STREAM_BOUND, "one stream holds {held} buffers");
            // Another stream still receives meanwhile.
            let mut other = other;
            other.write_all(b"still flowing").unwrap();
            drop(other);
            assert_eq!(read_to_end(&servers[1], 64).await, b"still flowing");
            // Now read it all, slowly: every byte arrives, in order.
            let got = read_to_end(s, 1000).await;
            writer.join().unwrap();
            assert!(got == sent, "every byte, in order");
            let st = Reactor::with_current(|r| r.stats()).unwrap();
            assert_eq!(st.recv_buffers_held, 0, "every buffer back in the ring");
            if Reactor::with_current(|r| r.backend()) == Some(Backend::Uring) {
                assert!(st.recv_arms > 2, "the receive paused and was armed again");
            } else {
                assert_eq!(st.recv_arms, 0, "epoll receives by readiness");
            }
        });
    }

    fn a_stream_that_never_reads_leaves_the_ring_to_fifty_others(r: &Reactor) {
        // One peer floods a stream the application never reads; fifty others exchange
        // messages with echo tasks meanwhile. The silent stream keeps its share of the ring
        // and no more, so the others never wait for buffers it holds.
        let r = tests::multishot_on(r.backend());
        r.block_on(async {
            let (mut clients, servers) = connections(51).await;
            let mut servers = servers.into_iter();
            let silent = servers.next().unwrap();
            let flooder = clients.remove(0);
            let flood = std::thread::spawn(move || {
                let mut f = flooder;
                f.write_all(b"x").unwrap();
                f.set_nonblocking(true).unwrap();
                let chunk = data(64 << 10, 9);
                let (mut sent, mut idle) = (0usize, Instant::now());
                while idle.elapsed() < Duration::from_millis(300) {
                    match f.write(&chunk) {
                        Ok(n) => {
                            sent += n;
                            idle = Instant::now();
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => panic!("flood: {e}"),
                    }
                }
                (f, sent)
            });
            let (res, _) = silent.read(Vec::with_capacity(1)).await; // arms its receive
            assert_eq!(res.unwrap(), 1);
            let echoes: Vec<_> = servers
                .map(|s| {
                    Reactor::with_current(|r| {
                        r.spawn_local(async move {
                            loop {
                                let (res, buf) = s.read(Vec::with_capacity(4096)).await;
                                if res.unwrap() == 0 {
                                    return;
                                }
                                s.write_all(buf).await.0.unwrap();
                            }
                        })
                    })
                    .unwrap()
                })
                .collect();
            let exchanges = std::thread::spawn(move || {
                for round in 0..20 {
                    for (i, c) in clients.iter_mut().enumerate() {
                        let msg = data(1000, round * 64 + i);
                        c.write_all(&msg).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        let mut back = vec![0u8; msg.len()];
                        std::io::Read::read_exact(c, &mut back).unwrap();
                        assert!(back == msg, "stream {i}, round {round}: the echo");
                    }
                }
            });
            while !exchanges.is_finished() {
                reactor::time::sleep(Duration::from_millis(5)).await;
            }
            exchanges.join().unwrap();
            for e in echoes {
                e.abort();
            }
            let (_flooder, sent) = flood.join().unwrap();
            assert!(sent > 2 << 20, "the flood filled more than the ring: {sent} bytes");
            let held = Reactor::with_current(|r| r.stats().recv_buffers_held).unwrap();
            assert!(held <= STREAM_BOUND, "the silent stream holds {held} buffers");
            drop(silent);
        });
    }

    fn a_ring_with_every_buffer_held_recovers_without_losing_bytes(r: &Reactor) {
        // 100 streams, each sent 48 KiB (12 buffers) before anything is read: more than the
        // ring's 512 buffers. Receives stop with ENOBUFS and are armed again as reads give
        // buffers back.
        let r = tests::multishot_on(r.backend());
        r.block_on(async {
            let (clients, servers) = connections(100).await;
            let writer = std::thread::spawn(move || {
                for (i, mut c) in clients.into_iter().enumerate() {
                    c.write_all(&data(48 << 10, i)).unwrap();
                }
            });
            // Arm every receive, reading a first byte each.
            let mut firsts = Vec::new();
            for s in &servers {
                let (res, b) = s.read(Vec::with_capacity(1)).await;
                assert_eq!(res.unwrap(), 1);
                firsts.push(b[0]);
            }
            writer.join().unwrap();
            let_it_receive().await;
            let held = Reactor::with_current(|r| r.stats().recv_buffers_held).unwrap();
            if Reactor::with_current(|r| r.backend()) == Some(Backend::Uring) {
                assert!(held > 400, "the streams hold most of the ring: {held}");
            }
            for (i, s) in servers.iter().enumerate() {
                let mut got = vec![firsts[i]];
                got.extend(read_to_end(s, 4096).await);
                assert!(got == data(48 << 10, i), "stream {i}: every byte, in order");
            }
            let held = Reactor::with_current(|r| r.stats().recv_buffers_held).unwrap();
            assert_eq!(held, 0, "every buffer back in the ring");
        });
    }

    fn streams_dropped_with_data_held_give_their_buffers_back(r: &Reactor) {
        let r = tests::multishot_on(r.backend());
        r.block_on(async {
            for round in 0..3 {
                let (clients, servers) = connections(64).await;
                let writer = std::thread::spawn(move || {
                    let mut clients = clients;
                    for (i, c) in clients.iter_mut().enumerate() {
                        c.write_all(&data(64 << 10, i)).unwrap();
                    }
                    clients
                });
                // Arm every receive (a first byte each), then hold what follows unread.
                for s in &servers {
                    let (res, _) = s.read(Vec::with_capacity(1)).await;
                    assert_eq!(res.unwrap(), 1);
                }
                let clients = writer.join().unwrap();
                let_it_receive().await;
                drop(servers);
                // The receives' cancellations and what completes before them come back too.
                let_it_receive().await;
                let held = Reactor::with_current(|r| r.stats().recv_buffers_held).unwrap();
                assert_eq!(held, 0, "round {round}: buffers back after the drop");
                drop(clients);
            }
            // And the ring still serves.
            let (mut clients, servers) = connections(1).await;
            clients[0].write_all(b"after").unwrap();
            drop(clients);
            assert_eq!(read_to_end(&servers[0], 16).await, b"after");
        });
    }

    fn connections_faster_than_accepts_are_all_accepted_once(r: &Reactor) {
        // 200 connections arriving while the application pauses after its first accept: more
        // than a listener queues (64), so its multishot accept pauses and is armed again (the
        // kernel's backlog holds the rest meanwhile); each connection is accepted once.
        let r = tests::multishot_on(r.backend());
        r.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = l.local_addr().unwrap();
            let clients = std::thread::spawn(move || {
                (0..200u32)
                    .map(|i| {
                        let mut c = std::net::TcpStream::connect(addr).unwrap();
                        c.write_all(&i.to_le_bytes()).unwrap();
                        c
                    })
                    .collect::<Vec<_>>()
            });
            let mut seen = [false; 200];
            for k in 0..200 {
                if k == 1 {
                    // The first accept armed the multishot accept: let connections pile up.
                    let_it_receive().await;
                }
                let (s, _) = l.accept().await.unwrap();
                let mut id = Vec::new();
                while id.len() < 4 {
                    let (res, b) = s.read(Vec::with_capacity(4 - id.len())).await;
                    assert!(res.unwrap() > 0);
                    id.extend_from_slice(&b);
                }
                let i = u32::from_le_bytes(id.try_into().unwrap()) as usize;
                assert!(!std::mem::replace(&mut seen[i], true), "connection {i} twice");
            }
            assert!(seen.iter().all(|s| *s));
            drop(clients.join().unwrap());
        });
    }

    fn a_listener_dropped_with_queued_connections_closes_them(r: &Reactor) {
        let r = tests::multishot_on(r.backend());
        r.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = l.local_addr().unwrap();
            let mut clients: Vec<_> =
                (0..10).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
            // The first accept arms the multishot accept, which queues the other nine.
            let (first, _) = l.accept().await.unwrap();
            let_it_receive().await;
            drop(l);
            let_it_receive().await;
            for (i, c) in clients.iter_mut().enumerate().skip(1) {
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut b = [0u8; 1];
                match std::io::Read::read(c, &mut b) {
                    Ok(0) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                    other => panic!("client {i}: {other:?}"),
                }
            }
            drop(first);
        });
    }

    fn into_std_refuses_to_drop_received_bytes(r: &Reactor) {
        let backend = r.backend();
        let r = tests::multishot_on(backend);
        r.block_on(async {
            let (mut clients, mut servers) = connections(2).await;
            // Nothing unread: the receive is cancelled and the socket handed over.
            let s = servers.remove(0);
            clients[0].write_all(b"a").unwrap();
            let (res, b) = s.read(Vec::with_capacity(4)).await;
            assert_eq!((res.unwrap(), &b[..]), (1, &b"a"[..]));
            let std_s = s.into_std().await.unwrap();
            clients[0].write_all(b"bc").unwrap();
            let mut std_s = std_s;
            std_s.set_nonblocking(false).unwrap();
            let mut two = [0u8; 2];
            std::io::Read::read_exact(&mut std_s, &mut two).unwrap();
            assert_eq!(&two, b"bc", "what came after the conversion went to the std socket");
            // Bytes received and not read: an error on io_uring (epoll never holds any).
            let s = servers.remove(0);
            clients[1].write_all(b"x").unwrap();
            let (res, _) = s.read(Vec::with_capacity(1)).await;
            assert_eq!(res.unwrap(), 1);
            clients[1].write_all(&data(1000, 3)).unwrap();
            let_it_receive().await;
            match (backend, s.into_std().await) {
                (Backend::Uring, Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData),
                (Backend::Epoll, Ok(_)) => {}
                (b, other) => panic!("{b}: {other:?}"),
            }
        });
    }
}
