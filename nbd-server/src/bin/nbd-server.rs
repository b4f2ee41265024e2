//! `nbd-server FILE`: serves a file over NBD on the reactor until SIGINT or SIGTERM.
//! See `nbd-server --help` and [`nbd_server::args::main`].

fn main() -> std::process::ExitCode {
    nbd_server::args::main(std::env::args().skip(1))
}
