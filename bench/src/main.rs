//! `cargo run --release -p bench`: measures the reactor's io_uring and epoll backends against
//! each other, against peers and against raw system-call floors, in one process, and prints a
//! Markdown table.
//!
//! Flags: `--scenario NAME` (repeatable), `--runs N` (default 5), `--quick` (default) or
//! `--full`, `--json PATH`, `--plot PATH`, `--list`.

mod measure;
mod plot;
mod report;
mod scenarios;
mod table;

use std::process::ExitCode;

use scenarios::{ALL, Ctx};

struct Args {
    scenarios: Vec<String>,
    runs: usize,
    full: bool,
    list: bool,
    json: Option<String>,
    plot: Option<String>,
}

fn usage() -> &'static str {
    "usage: bench [--scenario NAME]... [--runs N] [--quick | --full] [--json PATH] [--plot PATH] [--list]"
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        scenarios: Vec::new(),
        runs: 5,
        full: false,
        list: false,
        json: None,
        plot: None,
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
            "-h" | "--help" => return Err(usage().into()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    for s in &a.scenarios {
        if !ALL.iter().any(|sc| sc.name == s) {
            let names: Vec<_> = ALL.iter().map(|s| s.name).collect();
            return Err(format!(
                "unknown scenario {s:?}; known: {}",
                names.join(", ")
            ));
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    // The nbd scenario runs the nbd-server program as a child process of this binary.
    if std::env::args().nth(1).as_deref() == Some(scenarios::nbd::SERVE_ARG) {
        return scenarios::nbd::serve(std::env::args().skip(2));
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
    let ctx = Ctx {
        runs: args.runs,
        full: args.full,
    };
    let mut rows = Vec::new();
    for (i, s) in ALL.iter().enumerate() {
        if !args.scenarios.is_empty() && !args.scenarios.iter().any(|n| n == s.name) {
            continue;
        }
        eprintln!("[{}/{}] {}: {}", i + 1, ALL.len(), s.name, s.about);
        let t0 = std::time::Instant::now();
        rows.extend((s.run)(&ctx));
        eprintln!("  ({} took {:.1} s)", s.name, t0.elapsed().as_secs_f64());
    }
    println!("{}", table::render(&rows));
    if let Some(path) = &args.json {
        if let Err(e) = std::fs::write(path, report::json(&rows)) {
            eprintln!("--json {path}: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("wrote {path}");
    }
    if let Some(path) = &args.plot {
        if let Err(e) = plot::svg(&rows, path) {
            eprintln!("--plot {path}: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("wrote {path}");
    }
    ExitCode::SUCCESS
}
