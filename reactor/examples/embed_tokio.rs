//! Driving the reactor from inside a tokio runtime: the reactor's fd in a tokio `AsyncFd`.
//! `cargo run -p reactor --example embed_tokio`
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

/// The reactor's fd, borrowed for tokio (the reactor outlives it).
struct ReactorFd(std::os::fd::RawFd);

impl AsRawFd for ReactorFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

fn main() -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = reactor::Reactor::new()?;
    let h = r.handle();
    std::thread::spawn(move || {
        for i in 0..3 {
            std::thread::sleep(Duration::from_millis(10));
            h.oneshot(move |_| println!("one-shot {i} ran on the reactor, driven by tokio"))
                .unwrap();
        }
        h.stop().unwrap();
    });
    let t = r.timer(|_| println!("reactor timer fired"));
    t.arm_after(Duration::from_millis(15));
    rt.block_on(async {
        // SAFETY: the reactor's fd stays open and the same until `r` is dropped, after this
        // block (and so after `fd`).
        let fd = unsafe { AsyncFd::register(ReactorFd(r.as_raw_fd())) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // tokio work runs alongside the reactor's.
        let tick = tokio::spawn(async { tokio::time::sleep(Duration::from_millis(5)).await });
        loop {
            let timeout = r.prepare_external_wait();
            if timeout != Some(Duration::ZERO) {
                let wait = timeout.unwrap_or(Duration::from_secs(3600));
                if let Ok(guard) = tokio::time::timeout(wait, fd.readable()).await {
                    guard?.clear_ready();
                }
            }
            r.poll(false);
            if r.stop_requested() {
                break;
            }
        }
        tick.await.expect("tokio task");
        std::io::Result::Ok(())
    })
}
