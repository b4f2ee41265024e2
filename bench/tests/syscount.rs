//! The bench's `sc/op` agrees with a count made from outside its process: the scenarios that
//! show it run under `strace -f`, with markers around each counted section
//! (`BENCH_SYSCALL_MARKERS=1`), and for every section the system calls strace saw from the
//! scenario's process between the markers match what the bench counted, within 10 %.
//! (Under strace a system runs slower and may make more calls than in a normal run; both
//! counts see the same run, which is what is compared.)

use std::process::Command;

/// The bench's own counts, in order: its `bench-syscount N` lines.
fn counted(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("bench-syscount "))
        .map(|n| n.trim().parse().expect("a count"))
        .collect()
}

/// strace's counts of the same sections: the calls of the scenario's process (its threads;
/// not the bench's parent process) between each pair of markers, the markers excluded. A
/// call that strace shows in two parts (`<unfinished ...>`, then `<... resumed>`) counts
/// once, at its start, as the kernel's counter does.
fn traced(log: &str, parent: u32) -> Vec<u64> {
    let mut sections = Vec::new();
    let mut open: Option<u64> = None;
    for line in log.lines() {
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        let call = call.trim_start();
        if pid == parent {
            continue;
        }
        if call.starts_with("write(-1, \"bench-sc-begin\"") {
            open = Some(0);
            continue;
        }
        if call.starts_with("write(-1, \"bench-sc-end\"") {
            sections.push(open.take().expect("an end marker after a begin marker"));
            continue;
        }
        let is_call =
            !call.starts_with("<...") && !call.starts_with("---") && !call.starts_with("+++");
        if let (Some(n), true) = (open.as_mut(), is_call) {
            *n += 1;
        }
    }
    sections
}

#[test]
fn sc_per_op_agrees_with_strace_on_bh_cross_pingpong_and_fd_pingpong() {
    let strace = Command::new("strace").arg("-V").output();
    assert!(
        strace.is_ok_and(|o| o.status.success()),
        "strace is needed (apt-get install strace; .ci/run installs it)"
    );
    let dir = std::env::temp_dir().join(format!("bench-syscount-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-s", "24", "-o"])
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_bench"))
        .args([
            "--scenario",
            "bh-cross",
            "--scenario",
            "pingpong",
            "--scenario",
            "fd-pingpong",
            "--runs",
            "1",
            "--timeout",
            "900",
        ])
        .env("BENCH_SYSCALL_MARKERS", "1")
        .output()
        .expect("run the bench under strace");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "the bench failed:\n{table}\n{stderr}");
    assert!(
        !stderr.contains("system calls not counted"),
        "the bench could not count system calls here: {stderr}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let parent: u32 = text
        .lines()
        .next()
        .and_then(|l| l.split_once(' '))
        .and_then(|(p, _)| p.parse().ok())
        .expect("strace's first line names the bench's pid");
    let ours = counted(&stderr);
    let theirs = traced(&text, parent);
    std::fs::remove_dir_all(&dir).unwrap();
    // bh-cross's 3 systems, pingpong's and pingpong-poll's 11, fd-pingpong's and
    // fd-pingpong-poll's 5: one count each.
    assert!(
        ours.len() >= 19,
        "one count per system of each row: {ours:?}"
    );
    assert_eq!(
        ours.len(),
        theirs.len(),
        "ours {ours:?}, strace's {theirs:?}"
    );
    for (i, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
        let slack = (b as f64 * 0.10).max(3.0);
        assert!(
            (a as f64 - b as f64).abs() <= slack,
            "section {i}: the bench counted {a} system calls, strace {b}\nours {ours:?}\nstrace's {theirs:?}"
        );
    }
    eprintln!("sections: ours {ours:?}, strace's {theirs:?}");
    assert!(table.contains("sc/op]"), "the table shows sc/op: {table}");
}
