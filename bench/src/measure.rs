//! Repeated runs and their summary: median with min–max.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What a figure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    /// Nanoseconds per operation (lower is better).
    NsPerOp,
    /// Operations per second (higher is better).
    OpsPerSec,
    /// A percentage (of CPU time; lower is better).
    Percent,
    /// Bytes per second (higher is better): a run's "operations" are its bytes.
    BytesPerSec,
}

impl Metric {
    pub fn unit(self) -> &'static str {
        match self {
            Metric::NsPerOp => "ns/op",
            Metric::OpsPerSec => "ops/s",
            Metric::Percent => "% CPU",
            Metric::BytesPerSec => "B/s",
        }
    }
}

/// One run of one system: its figure, and system calls per operation where known.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub value: f64,
    pub syscalls_per_op: Option<f64>,
    /// CPU time of the system under test (the server thread), per operation.
    pub cpu_ns_per_op: Option<f64>,
    /// Heap allocations per operation on the thread that runs the system under test.
    pub allocs_per_op: Option<f64>,
    /// The part of `cpu_ns_per_op` the kernel accounted as system time (0 to 1).
    pub kernel_share: Option<f64>,
}

impl Sample {
    /// `ops` operations took `took`.
    pub fn timed(metric: Metric, ops: u64, took: Duration) -> Sample {
        assert!(ops > 0, "a run must do work");
        let ns = took.as_nanos() as f64 / ops as f64;
        let value = match metric {
            Metric::NsPerOp => ns,
            Metric::OpsPerSec | Metric::BytesPerSec => 1e9 / ns,
            Metric::Percent => panic!("a percentage is not timed"),
        };
        Sample {
            value,
            syscalls_per_op: None,
            cpu_ns_per_op: None,
            allocs_per_op: None,
            kernel_share: None,
        }
    }

    pub fn with_syscalls(mut self, per_op: f64) -> Sample {
        self.syscalls_per_op = Some(per_op);
        self
    }

    /// CPU time `cpu` spent on `ops` operations: per operation, and the kernel's share.
    pub fn with_cpu_of(mut self, cpu: Cpu, ops: u64) -> Sample {
        self.cpu_ns_per_op = Some(cpu.ns as f64 / ops as f64);
        self.kernel_share = cpu.kernel_share();
        self
    }

    pub fn with_allocs(mut self, per_op: f64) -> Sample {
        self.allocs_per_op = Some(per_op);
        self
    }
}

/// The summary of several runs of one system in one scenario, or why it could not be measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub scenario: String,
    pub system: String,
    pub metric: Metric,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
    pub syscalls_per_op: Option<f64>,
    pub cpu_ns_per_op: Option<f64>,
    /// Heap allocations per operation, where counted.
    #[serde(default)]
    pub allocs_per_op: Option<f64>,
    /// The kernel's share of `cpu_ns_per_op` (0 to 1), where measured.
    #[serde(default)]
    pub kernel_share: Option<f64>,
    /// Set when the row failed (a panic, a crash, a time-out, an unmet precondition): the
    /// reason. The figures of a failed row are zero and are never shown.
    pub failed: Option<String>,
}

impl Summary {
    /// A row that could not be measured, with the reason.
    pub fn failed(scenario: &str, system: &str, metric: Metric, reason: String) -> Summary {
        Summary {
            scenario: scenario.to_string(),
            system: system.to_string(),
            metric,
            median: 0.0,
            min: 0.0,
            max: 0.0,
            runs: 0,
            syscalls_per_op: None,
            cpu_ns_per_op: None,
            allocs_per_op: None,
            kernel_share: None,
            failed: Some(reason),
        }
    }

    pub fn ok(&self) -> bool {
        self.failed.is_none()
    }

    pub fn of(scenario: &str, system: &str, metric: Metric, samples: &[Sample]) -> Summary {
        assert!(!samples.is_empty());
        let mut v: Vec<f64> = samples.iter().map(|s| s.value).collect();
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        let median_of = |f: fn(&Sample) -> Option<f64>| {
            let mut v: Vec<f64> = samples.iter().filter_map(f).collect();
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then(|| v[v.len() / 2])
        };
        Summary {
            scenario: scenario.to_string(),
            system: system.to_string(),
            metric,
            median,
            min: v[0],
            max: v[v.len() - 1],
            runs: v.len(),
            syscalls_per_op: median_of(|s| s.syscalls_per_op),
            cpu_ns_per_op: median_of(|s| s.cpu_ns_per_op),
            allocs_per_op: median_of(|s| s.allocs_per_op),
            kernel_share: median_of(|s| s.kernel_share),
            failed: None,
        }
    }
}

/// Runs `f` `runs` times and summarises.
pub fn repeat(
    scenario: &str,
    system: &str,
    metric: Metric,
    runs: usize,
    mut f: impl FnMut() -> Sample,
) -> Summary {
    let samples: Vec<Sample> = (0..runs).map(|_| f()).collect();
    Summary::of(scenario, system, metric, &samples)
}

/// CPU time of a thread or a process: the total, and the part the kernel accounted as
/// system time. `user_ns` and `system_ns` come from the kernel's tick-sampled accounting and
/// serve only to split `ns`, which is exact.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cpu {
    pub ns: u64,
    pub user_ns: u64,
    pub system_ns: u64,
}

impl Cpu {
    /// What was used between `before` and `self`.
    pub fn since(self, before: Cpu) -> Cpu {
        Cpu {
            ns: self.ns.saturating_sub(before.ns),
            user_ns: self.user_ns.saturating_sub(before.user_ns),
            system_ns: self.system_ns.saturating_sub(before.system_ns),
        }
    }

    /// The kernel's share of the time (0 to 1); `None` when the accounting saw no time at all.
    pub fn kernel_share(&self) -> Option<f64> {
        let total = self.user_ns + self.system_ns;
        (total > 0).then(|| self.system_ns as f64 / total as f64)
    }
}

/// The calling thread's CPU time so far: [`thread_cpu_ns`], split by `getrusage(RUSAGE_THREAD)`.
pub fn thread_cpu() -> Cpu {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid out-parameter.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    Cpu {
        ns: thread_cpu_ns(),
        user_ns: ns(ru.ru_utime),
        system_ns: ns(ru.ru_stime),
    }
}

/// CPU time consumed so far by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Times `f`, which performs `ops` operations.
/// Times `f`, which does `ops` operations; in the run that counts system calls (see
/// `syscount.rs`), counts them too.
pub fn time(metric: Metric, ops: u64, f: impl FnOnce()) -> Sample {
    let calls = crate::syscount::Section::start();
    let t0 = Instant::now();
    f();
    let took = t0.elapsed();
    let s = Sample::timed(metric, ops, took);
    match calls.finish() {
        Some(n) => s.with_syscalls(n as f64 / ops as f64),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_share_comes_from_the_split_and_survives_the_median() {
        let before = Cpu {
            ns: 1_000,
            user_ns: 100,
            system_ns: 100,
        };
        let after = Cpu {
            ns: 5_000,
            user_ns: 1_100,
            system_ns: 3_100,
        };
        let used = after.since(before);
        assert_eq!(used.ns, 4_000);
        assert_eq!(used.kernel_share(), Some(0.75));
        assert_eq!(Cpu::default().kernel_share(), None);
        let took = Duration::from_micros(1);
        let samples: Vec<Sample> = [0.5, 0.75, 0.6]
            .iter()
            .map(|&k| {
                let cpu = Cpu {
                    ns: 4_000,
                    user_ns: ((1.0 - k) * 1000.0) as u64,
                    system_ns: (k * 1000.0) as u64,
                };
                Sample::timed(Metric::OpsPerSec, 4, took).with_cpu_of(cpu, 4)
            })
            .collect();
        assert_eq!(samples[0].cpu_ns_per_op, Some(1_000.0));
        let s = Summary::of("x", "y", Metric::OpsPerSec, &samples);
        assert_eq!(s.kernel_share, Some(0.6));
    }

    #[test]
    fn this_thread_spends_its_time_in_the_kernel_when_it_makes_system_calls() {
        let before = thread_cpu();
        // 100 ms of this thread's own CPU time (however long a loaded machine makes that take):
        // enough ticks for the split.
        while thread_cpu_ns() - before.ns < 100_000_000 {
            for _ in 0..1000 {
                // SAFETY: getppid has no preconditions; a cheap system call to spend time in.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
        }
        let used = thread_cpu().since(before);
        assert!(used.ns >= 100_000_000);
        assert!(
            used.kernel_share().is_some_and(|k| k > 0.2),
            "system-call loop accounted as {used:?}"
        );
    }
}
