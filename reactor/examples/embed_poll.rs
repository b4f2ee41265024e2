//! Driving the reactor from a plain poll(2) loop (what a daemon with its own event loop does).
//! `cargo run -p reactor --example embed_poll`
use std::os::fd::AsRawFd;
use std::time::Duration;

fn main() -> std::io::Result<()> {
    let r = reactor::Reactor::new()?;
    let h = r.handle(); // another thread hands the reactor work, then asks it to stop
    std::thread::spawn(move || {
        for i in 0..3 {
            std::thread::sleep(Duration::from_millis(10));
            h.oneshot(move |_| println!("one-shot {i} ran inside the foreign loop"))
                .unwrap();
        }
        h.stop().unwrap();
    });
    let t = r.timer(|_| println!("timer fired"));
    t.arm_after(Duration::from_millis(15));
    loop {
        // Announce the wait; the reactor's fd wakes us for BHs, fds and timers.
        let timeout = r.prepare_external_wait();
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        let mut fds = [libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd (a real daemon would add its own fds here).
        unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        r.poll(false); // ends the announcement and runs what is ready
        if r.stop_requested() {
            return Ok(());
        }
    }
}
