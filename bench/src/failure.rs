//! Why a row failed: the messages of the panics raised while it ran (on any thread), and the
//! `--inject-failure` test hook that makes a chosen scenario fail on purpose.

use std::any::Any;
use std::sync::Mutex;

/// Panic messages with their locations, in the order they were raised, on any thread.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records every panic's message and location (and still prints it, as the default hook does).
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let msg = payload_text(info.payload());
        if let Ok(mut v) = PANICS.lock() {
            v.push(format!("{msg}{at}"));
        }
        default(info);
    }));
}

/// A position in the panic record, taken before a row runs.
pub fn mark() -> usize {
    PANICS.lock().map(|v| v.len()).unwrap_or(0)
}

/// The reason for a failure whose panic payload is `payload`: the first panic raised since
/// `mark` (on any thread: the root cause, when a helper thread's panic made the measuring
/// thread's wait fail), else the payload itself.
pub fn reason(mark: usize, payload: &(dyn Any + Send)) -> String {
    let first = PANICS.lock().ok().and_then(|v| v.get(mark).cloned());
    let text = first.unwrap_or_else(|| format!("panicked: {}", payload_text(payload)));
    one_line(&text)
}

fn payload_text(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".into()
    }
}

/// `s` on one line, at most 300 characters: reasons go into a table cell and a log line.
pub fn one_line(s: &str) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match flat.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat,
    }
}

/// How `--inject-failure SCENARIO:KIND` makes a scenario fail, to test that a failure never
/// loses the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inject {
    /// The scenario panics before its first row (like an unmet precondition).
    Setup,
    /// The first row panics (as its last run starts); the scenario's other rows still run.
    Panic,
    /// The process aborts as the second row's last run starts (every run made before is
    /// already reported).
    Abort,
    /// The second row's last run never finishes (the scenario's time limit ends it).
    Hang,
}

impl Inject {
    pub const KINDS: &'static str = "setup, panic, abort, hang";

    pub fn parse(kind: &str) -> Option<Inject> {
        Some(match kind {
            "setup" => Inject::Setup,
            "panic" => Inject::Panic,
            "abort" => Inject::Abort,
            "hang" => Inject::Hang,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Inject::Setup => "setup",
            Inject::Panic => "panic",
            Inject::Abort => "abort",
            Inject::Hang => "hang",
        }
    }

    /// Called as row number `row` (from 0) of the scenario starts (an interleaved row: as its
    /// last run starts).
    pub fn at_row(self, row: usize) {
        match (self, row) {
            (Inject::Panic, 0) => panic!("injected failure (--inject-failure …:panic)"),
            (Inject::Abort, 1) => {
                eprintln!("  injected failure: aborting the process");
                std::process::abort()
            }
            (Inject::Hang, 1) => loop {
                std::thread::park();
            },
            _ => {}
        }
    }
}
