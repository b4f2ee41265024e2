//! `cargo run --release -p bench`: measures the reactor's io_uring and epoll backends against
//! each other, against peers and against raw system-call floors, in one process, and prints a
//! Markdown table.
//!
//! Flags (`bench --help` says more): `--scenario NAME` (repeatable), `--runs N` (default 5),
//! `--quick` (default) or `--full`, `--json PATH`, `--plot PATH`, `--list`, `--timeout SECS`
//! (per scenario; default 600 quick, 3600 full), `--inject-failure SCENARIO:KIND` (a test
//! hook: make a scenario fail on purpose; KIND is setup, panic, abort or hang), `--version`.
//!
//! Each scenario runs in a child process of its own. A scenario that fails (a panic, a failed
//! result check, an unmet precondition, a crash, a time-out) becomes a failed row with its
//! reason; the other scenarios still run, the table, JSON and plot are always written, and the
//! exit status is 1 when any row failed.

mod allocs;
mod failure;
mod isolate;
mod measure;
mod plot;
mod report;
mod scenarios;
mod syscount;
mod table;

use std::process::ExitCode;

use std::time::Duration;

/// Counts allocations per thread (see `allocs.rs`); otherwise the system allocator.
#[global_allocator]
static ALLOCATOR: allocs::Counting = allocs::Counting;

use failure::Inject;
use scenarios::ALL;

/// Measures the reactor's io_uring and epoll backends against each other, against peers
/// and against raw system-call floors, and prints a Markdown table.
#[derive(Debug, clap::Parser)]
#[command(name = "bench", version, after_help = AFTER_HELP)]
struct Args {
    /// Run this scenario only (repeatable; --list names them all).
    #[arg(long = "scenario", value_name = "NAME", value_parser = scenario)]
    scenarios: Vec<String>,
    /// Measured runs of each row, made in rounds over a row's systems (all but
    /// nbd-sparse-copy's); medians and min–max are reported.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..), env = "BENCH_RUNS")]
    runs: u32,
    /// Short measurements (the default).
    #[arg(long, overrides_with = "full")]
    quick: bool,
    /// Long measurements.
    #[arg(long, overrides_with = "quick")]
    full: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Write the results as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    json: Option<String>,
    /// Write an SVG chart of the ratios to PATH.
    #[arg(long, value_name = "PATH")]
    plot: Option<String>,
    /// Seconds each scenario may take before it is stopped and reported failed (default 600
    /// quick, 3600 full).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..), env = "BENCH_TIMEOUT")]
    timeout: Option<u64>,
    /// A test hook: make SCENARIO fail on purpose; KIND is setup, panic, abort or hang.
    #[arg(long, value_name = "SCENARIO:KIND", value_parser = injection)]
    inject_failure: Option<(String, Inject)>,
}

const AFTER_HELP: &str = "\
Each scenario runs in a child process of its own. A scenario that fails (a panic, a failed
result check, an unmet precondition, a crash, a time-out) becomes a failed row with its
reason; the other scenarios still run, the table, JSON and plot are always written, and the
exit status is 1 when any row failed.";

fn scenario(name: &str) -> Result<String, String> {
    if ALL.iter().any(|sc| sc.name == name) {
        return Ok(name.to_string());
    }
    let names: Vec<_> = ALL.iter().map(|s| s.name).collect();
    Err(format!("unknown scenario; known: {}", names.join(", ")))
}

fn injection(v: &str) -> Result<(String, Inject), String> {
    let (name, kind) = v.rsplit_once(':').ok_or("not SCENARIO:KIND")?;
    let kind = Inject::parse(kind)
        .ok_or_else(|| format!("unknown kind {kind:?}; known: {}", Inject::KINDS))?;
    Ok((scenario(name)?, kind))
}

fn main() -> ExitCode {
    // The nbd scenario runs the nbd-server program as a child process of this binary.
    if std::env::args().nth(1).as_deref() == Some(scenarios::nbd_servers::SERVE_ARG) {
        return scenarios::nbd_servers::serve(std::env::args().skip(2));
    }
    // Each scenario runs as a child process of this binary.
    if std::env::args().nth(1).as_deref() == Some(isolate::CHILD_ARG) {
        return isolate::child(std::env::args().skip(2));
    }
    let args = match <Args as clap::Parser>::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if args.list {
        for s in ALL {
            println!("{:<12} {}", s.name, s.about);
        }
        return ExitCode::SUCCESS;
    }
    let settings = isolate::Settings {
        runs: args.runs as usize,
        full: args.full,
        timeout: Duration::from_secs(args.timeout.unwrap_or(if args.full { 3600 } else { 600 })),
        inject: args.inject_failure,
    };
    let mut rows = Vec::new();
    for (i, s) in ALL.iter().enumerate() {
        if !args.scenarios.is_empty() && !args.scenarios.iter().any(|n| n == s.name) {
            continue;
        }
        eprintln!("[{}/{}] {}: {}", i + 1, ALL.len(), s.name, s.about);
        let t0 = std::time::Instant::now();
        rows.extend(isolate::run(s, &settings));
        eprintln!("  ({} took {:.1} s)", s.name, t0.elapsed().as_secs_f64());
    }
    // Everything is written even when something failed; only then does the status say so.
    println!("{}", table::render(&rows));
    let mut status = ExitCode::SUCCESS;
    if let Some(path) = &args.json {
        match std::fs::write(path, report::json(&rows)) {
            Ok(()) => eprintln!("wrote {path}"),
            Err(e) => {
                eprintln!("--json {path}: {e}");
                status = ExitCode::FAILURE;
            }
        }
    }
    if let Some(path) = &args.plot {
        match plot::svg(&rows, path) {
            Ok(()) => eprintln!("wrote {path}"),
            Err(e) => {
                eprintln!("--plot {path}: {e}");
                status = ExitCode::FAILURE;
            }
        }
    }
    let failed = rows.iter().filter(|r| !r.ok()).count();
    if failed > 0 {
        eprintln!("bench: {failed} row(s) failed (listed under the table)");
        status = ExitCode::FAILURE;
    }
    status
}
