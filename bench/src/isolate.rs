//! Each scenario runs in a child process of its own, so that nothing one scenario does (a
//! panic, an abort, a hang, a crash in a peer's runtime) can lose the results of the others.
//!
//! The child (`bench --run-scenario NAME ...`) prints each row on standard output as soon as
//! it is measured (`BENCH-ROW <json>`; a row measured in rounds, again after each of its
//! runs, and the latest stands), and the scenario's final list (`BENCH-FINAL <json>`)
//! when it ends. The parent keeps what it received: the final list if it came, else the rows
//! streamed before the child died, plus a failed row that says how the child ended. A child
//! that outlives its time limit is killed.

use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::failure::{self, Inject};
use crate::measure::Metric;
use crate::scenarios::{ALL, Ctx, Row, Scenario};

/// The hidden first argument that makes this binary run one scenario as a child.
pub const CHILD_ARG: &str = "--run-scenario";
const ROW: &str = "BENCH-ROW ";
const FINAL: &str = "BENCH-FINAL ";

/// What the parent passes on to a child.
pub struct Settings {
    pub runs: usize,
    pub full: bool,
    pub timeout: Duration,
    pub inject: Option<(String, Inject)>,
}

/// Runs `sc` in a child process and returns its rows; never panics: whatever goes wrong
/// becomes a failed row.
pub fn run(sc: &Scenario, set: &Settings) -> Vec<Row> {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            return vec![process_failed(
                sc,
                &[],
                format!("cannot find own executable: {e}"),
            )];
        }
    };
    let mut cmd = Command::new(exe);
    cmd.args([CHILD_ARG, sc.name, "--runs", &set.runs.to_string()]);
    if set.full {
        cmd.arg("--full");
    }
    if let Some((name, kind)) = &set.inject {
        if name == sc.name {
            cmd.args(["--inject-failure", &format!("{name}:{}", kind.name())]);
        }
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches no memory of this process. It makes the
    // child die with this process (Ctrl-C, kill): no orphaned scenario keeps loading the machine.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return vec![process_failed(
                sc,
                &[],
                format!("cannot start the child: {e}"),
            )];
        }
    };
    let out = child.stdout.take().expect("stdout was piped");
    let (tx, rx) = mpsc::channel();
    // Not joined: a peer's process started by the child may hold the pipe open after the
    // child is gone; the thread ends when the last holder closes it.
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + set.timeout;
    let mut streamed: Vec<Row> = Vec::new();
    let mut final_rows: Option<Vec<Row>> = None;
    let mut timed_out = false;
    let mut exited = None;
    while exited.is_none() {
        let take = |line: String, streamed: &mut Vec<Row>, final_rows: &mut Option<Vec<Row>>| {
            if let Some(j) = line.strip_prefix(ROW) {
                match serde_json::from_str::<Row>(j) {
                    // An interleaved row is reported again after each of its runs: the
                    // latest report stands for it.
                    Ok(r) => match streamed
                        .iter_mut()
                        .find(|s| s.scenario == r.scenario && s.system == r.system)
                    {
                        Some(s) => *s = r,
                        None => streamed.push(r),
                    },
                    Err(e) => eprintln!("  bench: unreadable row from the child ({e}): {j}"),
                }
            } else if let Some(j) = line.strip_prefix(FINAL) {
                match serde_json::from_str(j) {
                    Ok(r) => *final_rows = Some(r),
                    Err(e) => eprintln!("  bench: unreadable final rows from the child ({e})"),
                }
            } else {
                // Something else wrote to the child's standard output (a peer's process).
                eprintln!("{line}");
            }
        };
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => take(line, &mut streamed, &mut final_rows),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The pipe is closed: the child is ending; don't spin while it does.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(20))
            }
        }
        exited = match child.try_wait() {
            Ok(Some(s)) => Some(Ok(s)),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                Some(child.wait())
            }
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        };
        if exited.is_some() {
            // What the child wrote before it ended is in the pipe: read it all.
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                take(line, &mut streamed, &mut final_rows);
            }
        }
    }
    let status = exited.expect("the loop ends when the child has");
    let ended = match (&status, timed_out) {
        (_, true) => Some(format!(
            "timed out after {} s (--timeout) and was killed",
            set.timeout.as_secs()
        )),
        (Ok(s), false) if s.success() => None,
        (Ok(s), false) => Some(match (s.code(), s.signal()) {
            (Some(c), _) => format!("the scenario's process exited with status {c}"),
            (None, Some(sig)) => {
                format!("the scenario's process was killed by {}", signal_name(sig))
            }
            _ => format!("the scenario's process ended: {s}"),
        }),
        (Err(e), false) => Some(format!("cannot wait for the scenario's process: {e}")),
    };
    match (final_rows, ended) {
        (Some(rows), None) => rows,
        (Some(mut rows), Some(why)) => {
            rows.push(process_failed(sc, &rows, why));
            rows
        }
        (None, why) => {
            let why = why.unwrap_or_else(|| "the scenario's process reported no result".into());
            let row = process_failed(sc, &streamed, why);
            streamed.push(row);
            streamed
        }
    }
}

/// The failed row that stands for a whole scenario (its process, or its setup).
fn process_failed(sc: &Scenario, rows: &[Row], why: String) -> Row {
    let metric = rows.first().map_or(Metric::NsPerOp, |r| r.metric);
    eprintln!("  {}: FAILED: {why}", sc.name);
    Row::failed(sc.name, "(scenario)", metric, failure::one_line(&why))
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGKILL => "SIGKILL (the OOM killer?)",
        libc::SIGTERM => "SIGTERM",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        _ => return format!("signal {sig}"),
    };
    format!("{name} (signal {sig})")
}

/// The child: `bench --run-scenario NAME --runs N [--full] [--inject-failure NAME:KIND]`.
pub fn child(mut args: impl Iterator<Item = String>) -> ExitCode {
    failure::install_hook();
    let name = args.next().unwrap_or_default();
    let Some(sc) = ALL.iter().find(|s| s.name == name) else {
        eprintln!("bench: unknown scenario {name:?}");
        return ExitCode::from(2);
    };
    let (mut runs, mut full, mut inject) = (1, false, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--full" => full = true,
            "--inject-failure" => {
                inject = args
                    .next()
                    .and_then(|v| Inject::parse(v.rsplit(':').next().unwrap_or("")));
            }
            _ => {}
        }
    }
    let ctx = Ctx::new(runs, full, inject, Box::new(|r| emit(ROW, &r)));
    let mark = failure::mark();
    let res = catch_unwind(AssertUnwindSafe(|| {
        if inject == Some(Inject::Setup) {
            panic!("injected failure (--inject-failure …:setup)");
        }
        (sc.run)(&ctx)
    }));
    let rows = res.unwrap_or_else(|p| {
        let why = failure::reason(mark, p.as_ref());
        let mut rows = ctx.measured();
        let metric = rows.first().map_or(Metric::NsPerOp, |r| r.metric);
        eprintln!("  {}: FAILED: {why}", sc.name);
        rows.push(Row::failed(sc.name, "(scenario)", metric, why));
        rows
    });
    emit(FINAL, &rows);
    ExitCode::SUCCESS
}

fn emit<T: serde::Serialize>(tag: &str, v: &T) {
    use std::io::Write;
    let json = serde_json::to_string(v).expect("plain data serialises");
    let mut out = std::io::stdout().lock();
    // A parent that is gone cannot be told; nothing else to do.
    let _ = writeln!(out, "{tag}{json}");
    let _ = out.flush();
}
