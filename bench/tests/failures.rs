//! No scenario can lose the run: a scenario made to fail on purpose (`--inject-failure`) shows
//! up as a failed row with its reason, the other scenarios' rows are all there, the table,
//! JSON and plot are written, and the exit status is 1.

use std::process::Command;

struct Run {
    status: Option<i32>,
    table: String,
    stderr: String,
    json: serde_json::Value,
    svg: String,
}

fn bench(inject: &str, extra: &[&str]) -> Run {
    bench_runs(inject, "1", extra)
}

fn bench_runs(inject: &str, runs: &str, extra: &[&str]) -> Run {
    let dir = std::env::temp_dir().join(format!(
        "bench-failures-{}-{}-runs{runs}",
        std::process::id(),
        inject.replace(':', "-")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("b.json"), dir.join("b.svg"));
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "--scenario",
            "bh-local",
            "--scenario",
            "idle-cpu",
            "--runs",
            runs,
        ])
        .args(["--inject-failure", inject])
        .args(extra)
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run the bench");
    let run = Run {
        status: out.status.code(),
        table: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        json: serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written"))
            .expect("valid JSON"),
        svg: std::fs::read_to_string(&svg).expect("plot written"),
    };
    std::fs::remove_dir_all(&dir).unwrap();
    run
}

fn rows<'a>(run: &'a Run, key: &str, scenario: &str) -> Vec<&'a serde_json::Value> {
    run.json[key]
        .as_array()
        .expect("an array")
        .iter()
        .filter(|r| r["scenario"] == scenario)
        .collect()
}

/// The other scenario (idle-cpu) is complete, whatever happened to bh-local.
fn others_present(run: &Run) {
    let idle = rows(run, "results", "idle-cpu-poll");
    let systems: Vec<&str> = idle.iter().map(|r| r["system"].as_str().unwrap()).collect();
    assert_eq!(systems, ["reactor-uring", "reactor-epoll"], "{}", run.table);
    assert!(run.table.contains("| idle-cpu-poll |"), "{}", run.table);
    assert!(run.svg.contains("<svg"));
    assert_eq!(run.status, Some(1), "a failed row makes the exit status 1");
}

#[test]
fn a_panicking_row_fails_alone() {
    let run = bench("bh-local:panic", &[]);
    let failed = rows(&run, "failures", "bh-local");
    assert_eq!(failed.len(), 1, "{:?}", run.json);
    assert_eq!(failed[0]["system"], "reactor-uring");
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("injected failure"),
        "{:?}",
        failed[0]
    );
    // The scenario's other rows were still measured.
    let ok: Vec<&str> = rows(&run, "results", "bh-local")
        .iter()
        .map(|r| r["system"].as_str().unwrap())
        .collect();
    assert_eq!(ok, ["reactor-epoll", "tokio"]);
    assert!(run.table.contains("Failed rows:"), "{}", run.table);
    others_present(&run);
}

#[test]
fn a_failed_precondition_fails_the_scenario_only() {
    let run = bench("bh-local:setup", &[]);
    let failed = rows(&run, "failures", "bh-local");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["system"], "(scenario)");
    others_present(&run);
}

/// The reason of the failed row of `system` in `scenario`.
fn failure<'a>(run: &'a Run, scenario: &str, system: &str) -> &'a str {
    rows(run, "failures", scenario)
        .into_iter()
        .find(|r| r["system"] == system)
        .unwrap_or_else(|| panic!("no failed row of {system}: {:?}", run.json))["reason"]
        .as_str()
        .unwrap()
}

#[test]
fn an_aborted_scenario_keeps_the_rows_it_measured() {
    let run = bench("bh-local:abort", &[]);
    // The row whose run was under way is failed (not missing), and so is the scenario.
    let failed = rows(&run, "failures", "bh-local");
    assert_eq!(failed.len(), 2, "{:?}", run.json);
    assert!(failure(&run, "bh-local", "reactor-epoll").contains("never ended"));
    assert!(failure(&run, "bh-local", "(scenario)").contains("SIGABRT"));
    // The first row was reported before the abort.
    let ok = rows(&run, "results", "bh-local");
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0]["system"], "reactor-uring");
    others_present(&run);
}

#[test]
fn runs_go_in_rounds_and_a_scenario_that_dies_keeps_every_run_it_made() {
    // bh-local's three rows, two runs each, the process aborted as the second row's last run
    // starts: the rounds made runs 1 of every row first, then run 2 of the first.
    let run = bench_runs("bh-local:abort", "2", &[]);
    let order: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.trim_start().starts_with("bh-local ") && l.contains(" of 2)"))
        .map(str::trim)
        .collect();
    assert_eq!(
        order,
        [
            "bh-local     reactor-uring (run 1 of 2)",
            "bh-local     reactor-epoll (run 1 of 2)",
            "bh-local     tokio (run 1 of 2)",
            "bh-local     reactor-uring (run 2 of 2)",
            "bh-local     reactor-epoll (run 2 of 2)",
        ],
        "{}",
        run.stderr
    );
    // Each row once, as it stood when the process died: the latest report of a row stands
    // for it.
    let ok: Vec<(&str, u64)> = rows(&run, "results", "bh-local")
        .iter()
        .map(|r| (r["system"].as_str().unwrap(), r["runs"].as_u64().unwrap()))
        .collect();
    assert_eq!(ok, [("reactor-uring", 2), ("tokio", 1)]);
    // The row whose run the abort interrupted is failed, not shown with its first run only.
    assert!(
        failure(&run, "bh-local", "reactor-epoll").contains("its run 2 of 2 never ended"),
        "{:?}",
        run.json
    );
    assert!(failure(&run, "bh-local", "(scenario)").contains("SIGABRT"));
    others_present(&run);
}

#[test]
fn a_hanging_scenario_is_killed_at_its_time_limit() {
    let t0 = std::time::Instant::now();
    let run = bench("bh-local:hang", &["--timeout", "3"]);
    let failed = rows(&run, "failures", "bh-local");
    assert_eq!(failed.len(), 2, "{:?}", run.json);
    assert!(failure(&run, "bh-local", "reactor-epoll").contains("never ended"));
    assert!(failure(&run, "bh-local", "(scenario)").contains("timed out"));
    assert!(t0.elapsed() < std::time::Duration::from_secs(60));
    others_present(&run);
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    for args in [
        &["--inject-failure", "bh-local"][..],
        &["--inject-failure", "bh-local:melt"],
        &["--inject-failure", "nope:panic"],
        &["--timeout", "0"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_bench"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
    // A mistyped flag gets a suggestion; --version is not an error.
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bench"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--scenaro", "bh-local"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--scenario"));
    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("bench "));
}
