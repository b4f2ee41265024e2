//! QEMU's tools as peers: whether they are installed, and `qemu-img bench` runs.

use std::process::Command;
use std::time::Duration;

/// Whether `tool --version` runs.
pub fn available(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `qemu-img bench ARGS` (the caller gives everything after `bench`) and returns the
/// time it reports for its run; panics with its output if it fails or reports nothing.
pub fn img_bench(args: &[&str]) -> Duration {
    img_bench_on(args, None)
}

/// [`img_bench`], on CPU `cpu` only when given.
pub fn img_bench_on(args: &[&str], cpu: Option<usize>) -> Duration {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("bench").args(args);
    if let Some(cpu) = cpu {
        super::pin_child(&mut cmd, cpu);
    }
    let out = cmd.output().expect("run qemu-img bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img bench {args:?} failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secs: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .strip_suffix(" seconds.")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("unexpected qemu-img bench output: {text}"));
    assert!(secs > 0.0, "qemu-img bench run too short to time: {text}");
    Duration::from_secs_f64(secs)
}
