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
    let mut child = match spawn(sc, set) {
        Ok(c) => c,
        Err(why) => return vec![process_failed(sc, &[], why)],
    };
    let lines = read_lines(child.stdout.take().expect("stdout was piped"));
    let mut rows = Collected::default();
    let (status, timed_out) = wait(&mut child, set.timeout, &lines, &mut rows);
    conclude(sc, rows, ended(status, timed_out, set.timeout))
}

/// Starts the scenario's child process, which dies with this one.
fn spawn(sc: &Scenario, set: &Settings) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
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
    cmd.spawn()
        .map_err(|e| format!("cannot start the child: {e}"))
}

/// The child's standard output, line by line, from a thread of its own.
fn read_lines(out: std::process::ChildStdout) -> mpsc::Receiver<String> {
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
    rx
}

/// The rows a child reported: as it went, and its final ones.
#[derive(Default)]
struct Collected {
    streamed: Vec<Row>,
    final_rows: Option<Vec<Row>>,
}

impl Collected {
    /// Takes one line of the child's output.
    fn take(&mut self, line: String) {
        if let Some(j) = line.strip_prefix(ROW) {
            match serde_json::from_str::<Row>(j) {
                // An interleaved row is reported again after each of its runs: the latest
                // report stands for it.
                Ok(r) => match self
                    .streamed
                    .iter_mut()
                    .find(|s| s.scenario == r.scenario && s.system == r.system)
                {
                    Some(s) => *s = r,
                    None => self.streamed.push(r),
                },
                Err(e) => eprintln!("  bench: unreadable row from the child ({e}): {j}"),
            }
        } else if let Some(j) = line.strip_prefix(FINAL) {
            match serde_json::from_str(j) {
                Ok(r) => self.final_rows = Some(r),
                Err(e) => eprintln!("  bench: unreadable final rows from the child ({e})"),
            }
        } else {
            // Something else wrote to the child's standard output (a peer's process).
            eprintln!("{line}");
        }
    }
}

/// Collects the child's rows until it ends, killing it at `timeout`. Returns how it ended
/// and whether it was killed for the timeout.
fn wait(
    child: &mut std::process::Child,
    timeout: Duration,
    lines: &mpsc::Receiver<String>,
    rows: &mut Collected,
) -> (std::io::Result<std::process::ExitStatus>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => rows.take(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The pipe is closed: the child is ending; don't spin while it does.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(20))
            }
        }
        let (status, timed_out) = match child.try_wait() {
            Ok(Some(s)) => (Ok(s), false),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                (child.wait(), true)
            }
            Ok(None) => continue,
            Err(e) => (Err(e), false),
        };
        // What the child wrote before it ended is in the pipe: read it all.
        while let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) {
            rows.take(line);
        }
        return (status, timed_out);
    }
}

/// Why the child's end is a failure, if it is one.
fn ended(
    status: std::io::Result<std::process::ExitStatus>,
    timed_out: bool,
    timeout: Duration,
) -> Option<String> {
    match (&status, timed_out) {
        (_, true) => Some(format!(
            "timed out after {} s (--timeout) and was killed",
            timeout.as_secs()
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
    }
}

/// The scenario's rows: the final ones, or those streamed before it failed, with a failed
/// row for the failure.
fn conclude(sc: &Scenario, rows: Collected, ended: Option<String>) -> Vec<Row> {
    match (rows.final_rows, ended) {
        (Some(rows), None) => rows,
        (Some(mut rows), Some(why)) => {
            rows.push(process_failed(sc, &rows, why));
            rows
        }
        (None, why) => {
            let why = why.unwrap_or_else(|| "the scenario's process reported no result".into());
            let mut streamed = rows.streamed;
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
