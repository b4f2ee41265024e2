//! The Markdown table: one row per scenario, a column per system, medians with min–max.

use crate::measure::{Metric, Summary};

/// The systems that get their own column, in order.
pub const MAIN: [&str; 3] = ["reactor-uring", "reactor-epoll", "tokio"];

fn human(metric: Metric, v: f64) -> String {
    match metric {
        Metric::NsPerOp if v >= 1e6 => format!("{:.2} ms", v / 1e6),
        Metric::NsPerOp if v >= 1e3 => format!("{:.1} µs", v / 1e3),
        Metric::NsPerOp => format!("{v:.0} ns"),
        Metric::OpsPerSec if v >= 1e6 => format!("{:.2} M/s", v / 1e6),
        Metric::OpsPerSec if v >= 1e3 => format!("{:.1} k/s", v / 1e3),
        Metric::OpsPerSec => format!("{v:.0}/s"),
        Metric::Percent => format!("{v:.2}%"),
        Metric::BytesPerSec => format!("{:.0} MB/s", v / 1e6),
    }
}

fn cell(s: &Summary) -> String {
    if !s.ok() {
        return "**failed** (see below)".into();
    }
    let mut c = format!(
        "{} ({}–{})",
        human(s.metric, s.median),
        human(s.metric, s.min),
        human(s.metric, s.max)
    );
    if let Some(sc) = s.syscalls_per_op {
        c.push_str(&format!(" [{sc:.2} sc/op]"));
    }
    if let Some(a) = s.allocs_per_op {
        c.push_str(&format!(" [{a:.2} allocs/op]"));
    }
    if let Some(cpu) = s.cpu_ns_per_op {
        c.push_str(&format!(" [cpu {}/op", human(Metric::NsPerOp, cpu)));
        if let Some(k) = s.kernel_share {
            c.push_str(&format!(", {:.0}% kernel", k * 100.0));
        }
        c.push(']');
    }
    c
}

fn ratio(a: Option<&Summary>, b: Option<&Summary>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a.ok() && b.ok() && b.median > 0.0 => {
            format!("{:.2}", a.median / b.median)
        }
        _ => "—".into(),
    }
}

/// The floor of the ring path: a tuned raw ring.
pub const TUNED_FLOOR: &str = "floor-tuned-uring";

/// Whether reactor-uring and reactor-epoll run the same code in `scenario`, so that their
/// ratio is a tie by construction: the page-cached file rows, where both serve reads with
/// `preadv2(RWF_NOWAIT)` and small writes with `pwrite` on the loop thread.
pub fn same_path(scenario: &str) -> bool {
    scenario.starts_with("file-") && scenario.ends_with("-cached")
}

/// The floor that bounds reactor-uring's path in `scenario`, if it has one: for the
/// page-cached file rows the synchronous loop (one `pread`/`pwrite` per operation on one
/// thread: what the inline path does, without the reactor around it); for `O_DIRECT` file
/// rows and ring NOPs the tuned raw ring.
pub fn floor_of(scenario: &str) -> Option<&'static str> {
    if same_path(scenario) {
        Some(if scenario.starts_with("file-write-") {
            "floor-pwrite"
        } else {
            "floor-pread"
        })
    } else if scenario.starts_with("file-") || scenario.starts_with("ring-nop") {
        Some(TUNED_FLOOR)
    } else {
        None
    }
}

/// How many nanoseconds per operation `sys` spends above `floor` (from the medians), as a cell
/// suffix, for ops/s and ns/op rows; where the floor measured slower (a tie within this VM's
/// noise: a floor bounds from below), that it is at its floor.
fn over_floor(sys: Option<&Summary>, floor: Option<&Summary>) -> Option<String> {
    let (s, f) = (sys?, floor?);
    if !(s.ok() && f.ok() && s.median > 0.0 && f.median > 0.0) {
        return None;
    }
    let ns = match s.metric {
        Metric::OpsPerSec => 1e9 / s.median - 1e9 / f.median,
        Metric::NsPerOp => s.median - f.median,
        Metric::Percent | Metric::BytesPerSec => return None,
    };
    Some(if ns >= 0.0 {
        format!(" [{ns:+.0} ns/op over {}]", f.system)
    } else {
        format!(" [at {}]", f.system)
    })
}

/// Renders `rows` (grouped by scenario, in first-seen order).
pub fn render(rows: &[Summary]) -> String {
    let mut scenarios: Vec<&str> = Vec::new();
    for r in rows {
        if !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
    }
    let mut out = String::new();
    out.push_str("| scenario | metric | reactor-uring | reactor-epoll | tokio | floors and peers | uring/epoll | uring/tokio |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for sc in scenarios {
        let of = |sys: &str| rows.iter().find(|r| r.scenario == sc && r.system == sys);
        let metric = rows
            .iter()
            .find(|r| r.scenario == sc && r.ok())
            .or_else(|| rows.iter().find(|r| r.scenario == sc))
            .expect("scenario has rows")
            .metric;
        let mut main: Vec<String> = MAIN
            .iter()
            .map(|s| of(s).map_or("—".into(), cell))
            .collect();
        if let Some(extra) = over_floor(of(MAIN[0]), floor_of(sc).and_then(of)) {
            main[0].push_str(&extra);
        }
        let others: Vec<String> = rows
            .iter()
            .filter(|r| r.scenario == sc && !MAIN.contains(&r.system.as_str()))
            .map(|r| format!("{}: {}", r.system, cell(r)))
            .collect();
        out.push_str(&format!(
            "| {sc} | {} | {} | {} | {} | {} | {} | {} |\n",
            metric.unit(),
            main[0],
            main[1],
            main[2],
            if others.is_empty() {
                "—".into()
            } else {
                others.join("<br>")
            },
            if same_path(sc) {
                "= (same path)".into()
            } else {
                ratio(of(MAIN[0]), of(MAIN[1]))
            },
            ratio(of(MAIN[0]), of(MAIN[2])),
        ));
    }
    let failed: Vec<&Summary> = rows.iter().filter(|r| !r.ok()).collect();
    if !failed.is_empty() {
        out.push_str("\nFailed rows:\n");
        for r in failed {
            out.push_str(&format!(
                "- {} / {}: {}\n",
                r.scenario,
                r.system,
                r.failed.as_deref().unwrap_or("")
            ));
        }
    }
    let runs = rows.iter().map(|r| r.runs).max().unwrap_or(0);
    out.push_str(&format!(
        "\nCells: median (min–max) over {runs} runs, made in rounds (run 1 of every system of a \
         row, then run 2 of every one, and so on: a drift of the machine falls on all alike; all rows but \
         `nbd-sparse-copy`); `sc/op`: system calls per operation where \
         counted (every thread of the system, by the kernel: a perf counter on the \
         `raw_syscalls:sys_enter` tracepoint, in one more run of each system after the timed ones, \
         since counting slows system calls; absent where the counter cannot be opened, which needs \
         root and tracefs; `bench/tests/syscount.rs` checks it against strace); `allocs/op`: heap allocations per operation on the reactor's thread where counted; `cpu/op`: CPU time of the server per request (its thread; for `nbd-*` its whole process; per 64 KiB message in `tcp-echo-64KiB`), and the part of it the kernel accounted as system time (`% kernel`: from 10 ms ticks, so coarse on short runs, and a median of its own); `ns/op over floor-…`: reactor-uring's time per operation above the floor of its path, from the medians (page-cached file rows: `floor-pread`/`floor-pwrite`, one system call per operation on one thread, what the inline path does; `O_DIRECT` file rows and ring NOPs: `floor-tuned-uring`; `at floor-…` where the floor measured slower, a tie); on `file-write-*-cached` the ring loops (`raw-uring`, `tuned-uring`) are no floor: ext4 has no async buffered writes, so the kernel hands each to an io-wq worker. `=` in uring/epoll: both backends run the same inline code there, so the ratio is a tie by construction. Ratios divide medians: for ns/op below 1 means uring is faster, for ops/s \
         and MB/s above 1 does.\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::Sample;

    fn row(scenario: &str, system: &str, ops_per_sec: f64) -> Summary {
        let sample = Sample::timed(
            Metric::OpsPerSec,
            1_000_000,
            std::time::Duration::from_secs_f64(1e6 / ops_per_sec),
        );
        Summary::of(scenario, system, Metric::OpsPerSec, &[sample])
    }

    #[test]
    fn the_reactor_cell_says_its_cost_above_the_floor_of_its_path() {
        let direct = [
            row("file-rand-4k-qd1-direct", "reactor-uring", 1e6),
            row("file-rand-4k-qd1-direct", TUNED_FLOOR, 1.25e6),
        ];
        let t = render(&direct);
        assert!(t.contains("[+200 ns/op over floor-tuned-uring]"), "{t}");
        let cached = [
            row("file-rand-4k-qd1-cached", "reactor-uring", 1e6),
            row("file-rand-4k-qd1-cached", TUNED_FLOOR, 2e6),
            row("file-rand-4k-qd1-cached", "floor-pread", 1.25e6),
        ];
        let t = render(&cached);
        assert!(
            t.contains("[+200 ns/op over floor-pread]"),
            "the inline path's floor: {t}"
        );
        let slower_floor = [
            row("file-write-rand-4k-qd1-cached", "reactor-uring", 1e6),
            row("file-write-rand-4k-qd1-cached", "floor-pwrite", 0.9e6),
        ];
        let t = render(&slower_floor);
        let line = t.lines().nth(2).unwrap();
        assert!(
            line.contains("[at floor-pwrite]") && !line.contains("ns/op over"),
            "{t}"
        );
        assert!(
            !render(&direct[..1]).contains("ns/op over floor-tuned-uring]"),
            "no floor, no figure"
        );
    }

    #[test]
    fn cached_file_rows_have_no_backend_ratio() {
        let rows = [
            row("file-seq-4k-qd1-cached", "reactor-uring", 1e6),
            row("file-seq-4k-qd1-cached", "reactor-epoll", 0.8e6),
            row("file-seq-4k-qd1-direct", "reactor-uring", 1e6),
            row("file-seq-4k-qd1-direct", "reactor-epoll", 0.8e6),
        ];
        let t = render(&rows);
        let line = |sc: &str| {
            t.lines()
                .find(|l| l.starts_with(&format!("| {sc} ")))
                .unwrap()
        };
        assert!(
            line("file-seq-4k-qd1-cached").contains("| = (same path) |"),
            "{t}"
        );
        assert!(line("file-seq-4k-qd1-direct").contains("| 1.25 |"), "{t}");
    }
}
