//! `--json PATH`: the machine and every measured row, as JSON.

use serde::Serialize;

use crate::measure::Summary;

#[derive(Serialize)]
struct Machine {
    kernel: String,
    cpus: usize,
    cpu_model: String,
    memory_gib: f64,
}

#[derive(Serialize)]
struct Result<'a> {
    scenario: &'a str,
    system: &'a str,
    metric: &'static str,
    median: f64,
    min: f64,
    max: f64,
    runs: usize,
    syscalls_per_op: Option<f64>,
    cpu_ns_per_op: Option<f64>,
    allocs_per_op: Option<f64>,
    /// The kernel's share (0 to 1) of `cpu_ns_per_op`.
    kernel_cpu_share: Option<f64>,
}

#[derive(Serialize)]
struct Failure<'a> {
    scenario: &'a str,
    system: &'a str,
    reason: &'a str,
}

#[derive(Serialize)]
struct Report<'a> {
    machine: Machine,
    results: Vec<Result<'a>>,
    /// Rows that could not be measured, with the reason.
    failures: Vec<Failure<'a>>,
}

fn first_line_with(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
}

fn machine() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem_kib: f64 = first_line_with("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Machine {
        kernel,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model: first_line_with("/proc/cpuinfo", "model name").unwrap_or_default(),
        memory_gib: (mem_kib / (1024.0 * 1024.0) * 10.0).round() / 10.0,
    }
}

/// The JSON document for `rows`.
pub fn json(rows: &[Summary]) -> String {
    let failures = rows
        .iter()
        .filter_map(|r| {
            Some(Failure {
                scenario: &r.scenario,
                system: &r.system,
                reason: r.failed.as_deref()?,
            })
        })
        .collect();
    let results = rows
        .iter()
        .filter(|r| r.ok())
        .map(|r| Result {
            scenario: &r.scenario,
            system: &r.system,
            metric: match r.metric {
                crate::measure::Metric::NsPerOp => "ns_per_op",
                crate::measure::Metric::OpsPerSec => "ops_per_s",
                crate::measure::Metric::Percent => "percent",
                crate::measure::Metric::BytesPerSec => "bytes_per_s",
            },
            median: r.median,
            min: r.min,
            max: r.max,
            runs: r.runs,
            syscalls_per_op: r.syscalls_per_op,
            cpu_ns_per_op: r.cpu_ns_per_op,
            allocs_per_op: r.allocs_per_op,
            kernel_cpu_share: r.kernel_share,
        })
        .collect();
    serde_json::to_string_pretty(&Report {
        machine: machine(),
        results,
        failures,
    })
    .expect("plain data serialises")
}
