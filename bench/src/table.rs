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

/// The floor the reactor's per-operation cost is reported against, where a scenario has it.
pub const TUNED_FLOOR: &str = "floor-tuned-uring";

/// How many nanoseconds per operation `sys` spends above `floor` (from the medians; negative
/// when it is faster), as a cell suffix, for ops/s and ns/op rows.
fn over_floor(sys: Option<&Summary>, floor: Option<&Summary>) -> Option<String> {
    let (s, f) = (sys?, floor?);
    let ok = s.ok() && f.ok() && s.median > 0.0 && f.median > 0.0;
    let ns = match s.metric {
        Metric::OpsPerSec => 1e9 / s.median - 1e9 / f.median,
        Metric::NsPerOp => s.median - f.median,
        Metric::Percent | Metric::BytesPerSec => return None,
    };
    ok.then(|| format!(" [{ns:+.0} ns/op over {TUNED_FLOOR}]"))
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
        if let Some(extra) = over_floor(of(MAIN[0]), of(TUNED_FLOOR)) {
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
            ratio(of(MAIN[0]), of(MAIN[1])),
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
         counted; `allocs/op`: heap allocations per operation on the reactor's thread where counted; `cpu/op`: CPU time of the server per request (its thread; for `nbd-*` its whole process; per 64 KiB message in `tcp-echo-64KiB`), and the part of it the kernel accounted as system time (`% kernel`: from 10 ms ticks, so coarse on short runs, and a median of its own); `ns/op over floor-tuned-uring`: the reactor's time per operation above the tuned ring's, from the medians. Ratios divide medians: for ns/op below 1 means uring is faster, for ops/s \
         and MB/s above 1 does.\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::Sample;

    fn row(system: &str, ops_per_sec: f64) -> Summary {
        let sample = Sample::timed(
            Metric::OpsPerSec,
            1_000_000,
            std::time::Duration::from_secs_f64(1e6 / ops_per_sec),
        );
        Summary::of("file-x", system, Metric::OpsPerSec, &[sample])
    }

    #[test]
    fn the_reactor_cell_says_its_cost_above_the_tuned_floor() {
        let rows = [row("reactor-uring", 1e6), row(TUNED_FLOOR, 1.25e6)];
        let t = render(&rows);
        assert!(t.contains("[+200 ns/op over floor-tuned-uring]"), "{t}");
        let faster = [row("reactor-uring", 2e6), row(TUNED_FLOOR, 1e6)];
        assert!(
            render(&faster).contains("[-500 ns/op over"),
            "negative when faster"
        );
        assert!(
            !render(&rows[..1]).contains("ns/op over floor-tuned-uring]"),
            "no floor, no figure"
        );
    }
}
