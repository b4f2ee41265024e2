//! A TCP echo server on the reactor.
//!
//! ```sh
//! cargo run --release -p reactor --example echo -- 127.0.0.1:7878
//! REACTOR_BACKEND=epoll cargo run -p reactor --example echo -- 127.0.0.1:0 --self-test 50
//! ```
//!
//! With `--self-test N` it also runs N clients against itself, checks every echoed byte, prints
//! a summary and exits (status 0 on success).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;

use reactor::Reactor;
use reactor::net::{TcpListener, TcpStream};

async fn serve(s: TcpStream) -> std::io::Result<u64> {
    let mut total = 0;
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let (res, b) = s.read(buf).await;
        let n = res?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        let (res, b) = s.write_all(b).await;
        res?;
        buf = b;
    }
}

async fn client(addr: SocketAddr, id: usize) -> std::io::Result<()> {
    let s = Rc::new(TcpStream::connect(addr).await?);
    let data: Vec<u8> = (0..256 * 1024)
        .map(|i| ((i * 13 + id) % 251) as u8)
        .collect();
    let s2 = s.clone();
    let out = data.clone();
    let writer = Reactor::with_current(|r| {
        r.spawn_local(async move {
            for chunk in out.chunks(4096) {
                let (res, _) = s2.write_all(chunk.to_vec()).await;
                res?;
            }
            s2.shutdown(std::net::Shutdown::Write)
        })
    })
    .expect("on the reactor");
    let mut got = Vec::with_capacity(data.len());
    loop {
        let (res, b) = s.read(Vec::with_capacity(16 * 1024)).await;
        if res? == 0 {
            break;
        }
        got.extend_from_slice(&b);
    }
    writer
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    if got != data {
        return Err(std::io::Error::other(format!("client {id}: echo differs")));
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut addr: SocketAddr = "127.0.0.1:7878".parse().unwrap();
    let mut self_test = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--self-test" => self_test = args.next().and_then(|n| n.parse::<usize>().ok()),
            other => match other.parse() {
                Ok(a) => addr = a,
                Err(_) => {
                    eprintln!("usage: echo [ADDR] [--self-test N]");
                    return ExitCode::from(2);
                }
            },
        }
    }
    let r = match Reactor::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("echo: cannot create the reactor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = r.block_on(async move {
        let l = Rc::new(TcpListener::bind(addr)?);
        let local = l.local_addr()?;
        eprintln!(
            "echo: listening on {local} ({} backend)",
            Reactor::with_current(|r| r.backend()).unwrap()
        );
        let l2 = l.clone();
        let acceptor = Reactor::with_current(|r| {
            r.spawn_local(async move {
                loop {
                    let (s, peer) = l2.accept().await?;
                    Reactor::with_current(|r| {
                        r.spawn_local(async move {
                            if let Err(e) = serve(s).await {
                                eprintln!("echo: {peer}: {e}");
                            }
                        })
                        .detach()
                    });
                }
                #[allow(unreachable_code)]
                std::io::Result::Ok(())
            })
        })
        .unwrap();
        match self_test {
            None => acceptor
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?,
            Some(n) => {
                let clients: Vec<_> = (0..n)
                    .map(|i| Reactor::with_current(|r| r.spawn_local(client(local, i))).unwrap())
                    .collect();
                for c in clients {
                    c.await
                        .map_err(|e| std::io::Error::other(e.to_string()))??;
                }
                acceptor.abort();
                eprintln!("echo: self-test passed: {n} clients, 256 KiB each, every byte checked");
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo: {e}");
            ExitCode::FAILURE
        }
    }
}
