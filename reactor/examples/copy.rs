//! Copies a file with the reactor's file operations, several blocks in flight.
//!
//! ```sh
//! cargo run --release -p reactor --example copy -- SRC DST [--block BYTES] [--depth N]
//! REACTOR_BACKEND=epoll cargo run -p reactor --example copy -- SRC DST
//! ```
//!
//! On io_uring the reads and writes are io_uring operations; on epoll they run on the thread
//! pool. The copy ends with `fdatasync`.

use std::cell::Cell;
use std::process::ExitCode;
use std::rc::Rc;

use reactor::Reactor;
use reactor::fs::{File, OpenOptions};

async fn copy(src: String, dst: String, block: usize, depth: usize) -> std::io::Result<u64> {
    let len = std::fs::metadata(&src)?.len();
    let input = File::open(&src).await?;
    let output = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&dst)
        .await?;
    let next = Rc::new(Cell::new(0u64));
    let workers: Vec<_> = (0..depth)
        .map(|_| {
            let (input, output, next) = (input.clone(), output.clone(), next.clone());
            Reactor::with_current(|r| {
                r.spawn_local(async move {
                    let mut buf = Vec::with_capacity(block);
                    loop {
                        let off = next.get();
                        if off >= len {
                            return std::io::Result::Ok(());
                        }
                        next.set(off + block as u64);
                        let (res, b) = input.read_at(buf, off).await;
                        if res? == 0 {
                            return Ok(());
                        }
                        let (res, b) = output.write_all_at(b, off).await;
                        res?;
                        buf = b;
                    }
                })
            })
            .expect("on the reactor")
        })
        .collect();
    for w in workers {
        w.await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
    }
    output.fdatasync().await?;
    Ok(len)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut pos = Vec::new();
    let (mut block, mut depth) = (1 << 20, 8);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--block" => block = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--depth" => depth = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            _ => pos.push(a),
        }
    }
    if pos.len() != 2 || block == 0 || depth == 0 {
        eprintln!("usage: copy SRC DST [--block BYTES] [--depth N]");
        return ExitCode::from(2);
    }
    let dst = pos.pop().unwrap();
    let src = pos.pop().unwrap();
    let r = match Reactor::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("copy: cannot create the reactor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let backend = r.backend();
    let t0 = std::time::Instant::now();
    match r.block_on(copy(src, dst, block, depth)) {
        Ok(n) => {
            eprintln!("copy: {n} bytes in {:?} ({backend} backend)", t0.elapsed());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("copy: {e}");
            ExitCode::FAILURE
        }
    }
}
