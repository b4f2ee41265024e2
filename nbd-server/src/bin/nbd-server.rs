//! `nbd-server FILE`: serves a file over NBD on the reactor until SIGINT or SIGTERM.
//! See `nbd-server --help`.

use std::io::Write;
use std::process::ExitCode;

use nbd_server::Server;
use nbd_server::args::{self, Command};

fn main() -> ExitCode {
    let cfg = match args::parse(std::env::args().skip(1)) {
        Ok(Command::Serve(cfg)) => cfg,
        Ok(Command::Help) => {
            println!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("nbd-server: {e}");
            return ExitCode::from(2);
        }
    };
    // Block SIGINT and SIGTERM before any thread starts, so every thread inherits the mask
    // and the main thread alone takes them, with sigwait.
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on this thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let server = match Server::start(cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nbd-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        if let Some(a) = server.tcp_addr() {
            let _ = writeln!(out, "nbd-server: listening on tcp {a}");
        }
        if let Some(p) = server.unix_path() {
            let _ = writeln!(out, "nbd-server: listening on unix {}", p.display());
        }
        let _ = out.flush();
    }
    let mut sig = 0;
    // SAFETY: `set` is a valid signal set and `sig` a valid out-pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    server.shutdown();
    ExitCode::SUCCESS
}
