//! `cargo run --release -p bench`: measures the reactor's io_uring and epoll backends against
//! each other, against peers and against raw system-call floors, in one process, and prints a
//! Markdown table.
//!
//! Flags: `--scenario NAME` (repeatable), `--runs N` (default 5), `--quick` (default) or
//! `--full`, `--json PATH`, `--plot PATH`, `--list`, `--timeout SECS` (per scenario; default
//! 600 quick, 3600 full), `--inject-failure SCENARIO:KIND` (a test hook: make a scenario fail on
//! purpose; KIND is setup, panic, abort or hang).
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
mod table;

use std::process::ExitCode;

use std::time::Duration;

/// Counts allocations per thread (see `allocs.rs`); otherwise the system allocator.
#[global_allocator]
static ALLOCATOR: allocs::Counting = allocs::Counting;

use failure::Inject;
use scenarios::ALL;

struct Args {
    scenarios: Vec<String>,
    runs: usize,
    full: bool,
    list: bool,
    json: Option<String>,
    plot: Option<String>,
    timeout: Option<Duration>,
    inject: Option<(String, Inject)>,
}

fn usage() -> &'static str {
    "usage: bench [--scenario NAME]... [--runs N] [--quick | --full] [--json PATH] [--plot PATH] \
     [--timeout SECS] [--inject-failure SCENARIO:KIND] [--list]"
}

fn known(name: &str) -> Result<(), String> {
    if ALL.iter().any(|sc| sc.name == name) {
        return Ok(());
    }
    let names: Vec<_> = ALL.iter().map(|s| s.name).collect();
    Err(format!(
        "unknown scenario {name:?}; known: {}",
        names.join(", ")
    ))
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        scenarios: Vec::new(),
        runs: 5,
        full: false,
        list: false,
        json: None,
        plot: None,
        timeout: None,
        inject: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--scenario" => a
                .scenarios
                .push(it.next().ok_or("--scenario needs a name")?),
            "--runs" => {
                let v = it.next().ok_or("--runs needs a number")?;
                a.runs = v
                    .parse()
                    .map_err(|_| format!("--runs: not a number: {v}"))?;
                if a.runs == 0 {
                    return Err("--runs must be at least 1".into());
                }
            }
            "--quick" => a.full = false,
            "--full" => a.full = true,
            "--list" => a.list = true,
            "--json" => a.json = Some(it.next().ok_or("--json needs a path")?),
            "--plot" => a.plot = Some(it.next().ok_or("--plot needs a path")?),
            "--timeout" => {
                let v = it.next().ok_or("--timeout needs a number of seconds")?;
                let secs: u64 = v
                    .parse()
                    .map_err(|_| format!("--timeout: not a number of seconds: {v}"))?;
                if secs == 0 {
                    return Err("--timeout must be at least 1 second".into());
                }
                a.timeout = Some(Duration::from_secs(secs));
            }
            "--inject-failure" => {
                let v = it.next().ok_or("--inject-failure needs SCENARIO:KIND")?;
                let (name, kind) = v
                    .rsplit_once(':')
                    .ok_or_else(|| format!("--inject-failure: {v:?} is not SCENARIO:KIND"))?;
                let kind = Inject::parse(kind).ok_or_else(|| {
                    format!(
                        "--inject-failure: unknown kind {kind:?}; known: {}",
                        Inject::KINDS
                    )
                })?;
                known(name)?;
                a.inject = Some((name.to_string(), kind));
            }
            "-h" | "--help" => return Err(usage().into()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    for s in &a.scenarios {
        known(s)?;
    }
    Ok(a)
}

fn main() -> ExitCode {
    // The nbd scenario runs the nbd-server program as a child process of this binary.
    if std::env::args().nth(1).as_deref() == Some(scenarios::nbd::SERVE_ARG) {
        return scenarios::nbd::serve(std::env::args().skip(2));
    }
    // Each scenario runs as a child process of this binary.
    if std::env::args().nth(1).as_deref() == Some(isolate::CHILD_ARG) {
        return isolate::child(std::env::args().skip(2));
    }
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.list {
        for s in ALL {
            println!("{:<12} {}", s.name, s.about);
        }
        return ExitCode::SUCCESS;
    }
    let settings = isolate::Settings {
        runs: args.runs,
        full: args.full,
        timeout: args
            .timeout
            .unwrap_or(Duration::from_secs(if args.full { 3600 } else { 600 })),
        inject: args.inject,
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
