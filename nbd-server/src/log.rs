//! Logging what clients control without letting them control the log: client strings are
//! escaped and cut short, and conditions that can repeat without bound (an accept that keeps
//! failing) are logged at most once per interval, with the count of what was suppressed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most characters of a client's string that reach the log.
pub(crate) const MAX_CLIENT_CHARS: usize = 64;

/// `bytes` from a client, for a log line or an error message: printable ASCII as is, anything
/// else escaped, at most [`MAX_CLIENT_CHARS`] characters of it, and the full length when cut.
///
/// ```ignore
/// assert_eq!(client_str(b"disk\n"), "\"disk\\n\"");
/// ```
pub(crate) fn client_str(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for (shown, &b) in bytes.iter().enumerate() {
        if shown == MAX_CLIENT_CHARS {
            out.push_str(&format!("\"… ({} bytes)", bytes.len()));
            return out;
        }
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            b'\n' => out.push_str("\\n"),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('"');
    out
}

/// A condition logged at most once per interval; the next line says how many were suppressed.
#[derive(Debug)]
pub(crate) struct RateLimit {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    pub(crate) const fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// Calls `log(suppressed)` if the last line is older than the interval (with how many
    /// occurrences were not logged since), else counts this one as suppressed.
    pub(crate) fn log(&self, log: impl FnOnce(u64)) {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match st.0 {
            Some(t) if now.duration_since(t) < self.interval => st.1 += 1,
            _ => {
                let suppressed = std::mem::take(&mut st.1);
                st.0 = Some(now);
                drop(st);
                log(suppressed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_strings_are_escaped_and_bounded() {
        assert_eq!(client_str(b"disk"), "\"disk\"");
        assert_eq!(
            client_str(b"a\"b\\c\n\x00\xff"),
            "\"a\\\"b\\\\c\\n\\x00\\xff\""
        );
        let long = client_str(&[0xffu8; 65536]);
        assert!(long.len() < 300, "{}", long.len());
        assert!(long.ends_with("… (65536 bytes)"), "{long}");
    }

    #[test]
    fn a_repeating_condition_is_logged_once_per_interval() {
        let rl = RateLimit::new(Duration::from_millis(50));
        let mut lines = Vec::new();
        for _ in 0..1000 {
            rl.log(|s| lines.push(s));
        }
        assert_eq!(lines, [0]);
        std::thread::sleep(Duration::from_millis(60));
        rl.log(|s| lines.push(s));
        assert_eq!(lines, [0, 999], "the next line counts what was suppressed");
    }
}
