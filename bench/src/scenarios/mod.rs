//! The scenarios: each one measures every system it applies to, in the same process.

pub mod bh;
pub mod echo_floors;
pub mod fd_pingpong;
pub mod file_io;
pub mod fuse;
pub mod idle;
pub mod nbd;
pub mod nbd_copy;
pub mod nbd_direct;
pub mod nbd_fio;
pub mod nbd_servers;
pub mod nbd_tls;
pub mod pingpong;
pub mod qemu;
pub mod ring_nop;
pub mod tcp_echo;
pub mod timers;

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::failure::{self, Inject};
use crate::measure::{Metric, Sample, Summary, repeat};

/// Makes `cmd`'s child run on CPU `cpu` only (`sched_setaffinity` before it executes).
pub fn pin_child(cmd: &mut std::process::Command, cpu: usize) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only sched_setaffinity (a system call, async-signal-safe) on a set built on the
    // stack, in the child before it executes.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// One measured system of one scenario.
pub type Row = Summary;

/// Settings shared by the scenarios, and the rows measured so far.
pub struct Ctx {
    pub runs: usize,
    pub full: bool,
    /// How this scenario must fail on purpose (`--inject-failure`), if it must.
    pub inject: Option<Inject>,
    /// Called with each row as soon as it is measured (or has failed).
    pub on_row: Box<dyn Fn(&Row)>,
    started: Cell<usize>,
    measured: RefCell<Vec<Row>>,
}

impl Ctx {
    pub fn new(runs: usize, full: bool, inject: Option<Inject>, on_row: Box<dyn Fn(&Row)>) -> Ctx {
        Ctx {
            runs,
            full,
            inject,
            on_row,
            started: Cell::new(0),
            measured: RefCell::new(Vec::new()),
        }
    }

    /// The rows measured so far (failed ones included).
    pub fn measured(&self) -> Vec<Row> {
        self.measured.borrow().clone()
    }

    /// `full` operations per run in `--full` mode, `quick` otherwise.
    pub fn scale(&self, full: u64, quick: u64) -> u64 {
        if self.full { full } else { quick }
    }

    /// Measures one system: `runs` runs of `f`, with a progress line. A panic in `f` (a
    /// result check, an unmet precondition, a helper thread's death) fails this row only: it
    /// comes back as a failed row with the panic's message, and the scenario goes on.
    pub fn row(
        &self,
        scenario: &str,
        system: &str,
        metric: Metric,
        f: impl FnMut() -> Sample,
    ) -> Row {
        eprintln!("  {scenario:<12} {system}");
        let n = self.started.replace(self.started.get() + 1);
        let mark = failure::mark();
        let res = catch_unwind(AssertUnwindSafe(|| {
            if let Some(inject) = self.inject {
                inject.at_row(n);
            }
            repeat(scenario, system, metric, self.runs, f)
        }));
        let row = res.unwrap_or_else(|p| {
            let why = failure::reason(mark, p.as_ref());
            eprintln!("  {scenario:<12} {system}: FAILED: {why}");
            Row::failed(scenario, system, metric, why)
        });
        (self.on_row)(&row);
        self.measured.borrow_mut().push(row.clone());
        row
    }
}

/// One system of an [`Ctx::interleave`]d measurement: its name and one run of it.
pub struct System<'a> {
    name: String,
    run: Box<dyn FnMut() -> Sample + 'a>,
}

impl<'a> System<'a> {
    pub fn new(name: impl Into<String>, run: impl FnMut() -> Sample + 'a) -> System<'a> {
        System {
            name: name.into(),
            run: Box::new(run),
        }
    }
}

impl Ctx {
    /// Measures the `systems` of `scenario` in rounds: run 1 of each, then run 2 of each, and
    /// so on. This VM drifts over seconds (its vCPUs move between SMT siblings and separate
    /// cores, a neighbour's load comes and goes), and consecutive runs of one system would
    /// put a drift on that system alone; in rounds it falls on all of them alike, which is
    /// what the ratios between them need.
    ///
    /// As with [`row`](Self::row), a panic fails that system's row only (its later rounds
    /// are skipped). Each row is reported (`on_row`) as it grows, after every run, so that a
    /// scenario that dies keeps the runs it made; and before every run as failed, so that a
    /// run that crashes or hangs the process leaves its row failed rather than short.
    pub fn interleave(&self, scenario: &str, metric: Metric, systems: Vec<System<'_>>) -> Vec<Row> {
        self.interleave_with(scenario, metric, systems, false)
    }

    /// As [`interleave`](Self::interleave), then one more run of each system that did not
    /// fail, with its system calls counted (`syscount.rs`): that run gives the row its
    /// `sc/op`, the same way for every system, and nothing else (counting slows system calls).
    /// Where they cannot be counted, the rows have no `sc/op`.
    pub fn interleave_counting_syscalls(
        &self,
        scenario: &str,
        metric: Metric,
        systems: Vec<System<'_>>,
    ) -> Vec<Row> {
        self.interleave_with(scenario, metric, systems, true)
    }

    fn interleave_with(
        &self,
        scenario: &str,
        metric: Metric,
        systems: Vec<System<'_>>,
        count_syscalls: bool,
    ) -> Vec<Row> {
        let first = self.started.get();
        self.started.set(first + systems.len());
        let mut state: Vec<(System<'_>, Vec<Sample>, Option<String>)> =
            systems.into_iter().map(|s| (s, Vec::new(), None)).collect();
        let summary = |name: &str, samples: &[Sample], failed: &Option<String>| match failed {
            Some(why) => Row::failed(scenario, name, metric, why.clone()),
            None => Summary::of(scenario, name, metric, samples),
        };
        for round in 0..self.runs {
            for (i, (sys, samples, failed)) in state.iter_mut().enumerate() {
                if failed.is_some() {
                    continue;
                }
                eprintln!(
                    "  {scenario:<12} {} (run {} of {})",
                    sys.name,
                    round + 1,
                    self.runs
                );
                // Until this run ends, the row stands as failed: if the process dies or is
                // killed during it, that is the row that did it.
                let unfinished = Some(format!(
                    "its run {} of {} never ended: the scenario's process died or was killed \
                     during it",
                    round + 1,
                    self.runs
                ));
                (self.on_row)(&summary(&sys.name, samples, &unfinished));
                let mark = failure::mark();
                let res = catch_unwind(AssertUnwindSafe(|| {
                    // In the last round, so that a scenario made to die there has made runs
                    // of every row before (what `tests/failures.rs` checks it keeps).
                    if let (true, Some(inject)) = (round + 1 == self.runs, self.inject) {
                        inject.at_row(first + i);
                    }
                    (sys.run)()
                }));
                match res {
                    Ok(sample) => samples.push(sample),
                    Err(p) => {
                        let why = failure::reason(mark, p.as_ref());
                        eprintln!("  {scenario:<12} {}: FAILED: {why}", sys.name);
                        *failed = Some(why);
                    }
                }
                (self.on_row)(&summary(&sys.name, samples, failed));
            }
        }
        let mut rows: Vec<Row> = state
            .iter()
            .map(|(sys, samples, failed)| summary(&sys.name, samples, failed))
            .collect();
        if count_syscalls {
            match crate::syscount::available() {
                Ok(_) => {
                    for ((sys, _, failed), row) in state.iter_mut().zip(&mut rows) {
                        if failed.is_some() {
                            continue;
                        }
                        eprintln!("  {scenario:<12} {} (system calls counted)", sys.name);
                        let counted = catch_unwind(AssertUnwindSafe(|| {
                            crate::syscount::counting(|| (sys.run)())
                        }));
                        row.syscalls_per_op = match counted {
                            Ok(s) => s.syscalls_per_op,
                            Err(p) => {
                                let why = failure::reason(failure::mark(), p.as_ref());
                                eprintln!(
                                    "  {scenario:<12} {}: the counted run failed: {why}",
                                    sys.name
                                );
                                None
                            }
                        };
                        (self.on_row)(row);
                    }
                }
                Err(why) => eprintln!("  {scenario:<12} system calls not counted: {why}"),
            }
        }
        self.measured.borrow_mut().extend(rows.iter().cloned());
        rows
    }
}

/// A scenario: a name, what it measures, and the function that runs it.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&Ctx) -> Vec<Row>,
}

/// Every scenario, in the order the quick suite runs them.
pub const ALL: &[Scenario] = &[
    Scenario {
        name: "bh-local",
        about: "a BH rescheduling itself (ns per run)",
        run: bh::local,
    },
    Scenario {
        name: "bh-cross",
        about: "one producer thread posting one-shots into a busy reactor (ops/s)",
        run: bh::cross,
    },
    Scenario {
        name: "pingpong",
        about: "a BH bounced between two reactors on two threads (round-trip ns)",
        run: pingpong::run,
    },
    Scenario {
        name: "timers",
        about: "100k sleeping tasks fired (ns per timer); sleep(1 ms) lateness p50/p99 (ns late)",
        run: timers::run,
    },
    Scenario {
        name: "fd-pingpong",
        about: "a byte bounced over a socketpair through fd handlers on two threads (round-trip ns)",
        run: fd_pingpong::run,
    },
    Scenario {
        name: "tcp-echo",
        about: "64 loopback connections, 64 B and 1 KiB request/response (requests/s)",
        run: tcp_echo::run,
    },
    Scenario {
        name: "ring-nop",
        about: "one io_uring NOP per operation through the reactor vs a plain and a tuned raw ring, QD1/QD32 (ns per operation)",
        run: ring_nop::run,
    },
    Scenario {
        name: "file-read",
        about: "4 KiB reads over 256 MiB, random and sequential, QD1/QD32, cached and O_DIRECT (IOPS)",
        run: file_io::run_reads,
    },
    Scenario {
        name: "file-write",
        about: "4 KiB writes over 256 MiB, random and sequential, QD1/QD32, cached and O_DIRECT (IOPS)",
        run: file_io::run_writes,
    },
    Scenario {
        name: "nbd",
        about: "qemu-img bench against NBD servers: nbd-server on each backend, qemu-storage-daemon, qemu-nbd, nbdkit (requests/s; server CPU per request)",
        run: nbd::run,
    },
    Scenario {
        name: "nbd-fio",
        about: "fio's NBD engine against the same servers: random 4 KiB reads and writes, QD1/QD32, and 4 jobs on 4 connections (requests/s; server CPU per request)",
        run: nbd_fio::run,
    },
    Scenario {
        name: "nbd-direct",
        about: "qemu-img bench (4 KiB sequential reads and writes, QD1/QD32) and fio's NBD engine (4 KiB random and sequential reads and writes, QD1/QD32) against every server bypassing the page cache, on the disk, with fio's own io_uring O_DIRECT floor in each row's pattern (requests/s; server CPU per request). Settings: nbd-server --cache none (O_DIRECT); qemu-storage-daemon cache.direct=on,aio=io_uring; qemu-nbd --cache=none --aio=io_uring; nbdkit 1.32's file plugin has no O_DIRECT, its closest is cache=none",
        run: nbd_direct::run,
    },
    Scenario {
        name: "nbd-tls",
        about: "every server with TLS required, same keys: nbdcopy of the export over PSK and x509 (256 KiB requests), fio's NBD engine QD1/QD32 over x509; nbd-server without TLS as the reference (requests/s; server CPU per request)",
        run: nbd_tls::run,
    },
    Scenario {
        name: "fuse",
        about: "fio on a FUSE-mounted image (O_DIRECT on the mount): 4 KiB random reads, writes and a 70/30 mix, QD1 psync and QD32 io_uring, 1 and 2 jobs, against nbd-server --fuse with the io_uring transport, the classic one on io_uring and on epoll, qemu-storage-daemon's FUSE export (page cache, and cache.direct=on,aio=io_uring), and the same fio job on an image file with no FUSE as the ceiling (requests/s; server CPU per request)",
        run: fuse::run,
    },
    Scenario {
        name: "nbd-sparse-copy",
        about: "nbdcopy of a 4 GiB export holding 64 MiB of data from each server into a file (time per copy; server CPU per copy)",
        run: nbd_copy::run,
    },
    Scenario {
        name: "idle-cpu",
        about: "CPU use of an idle IoThread with adaptive polling on, after a burst of work (%)",
        run: idle::run,
    },
];
