//! `nbd-fio`: fio's NBD engine (libnbd) as a second client of the servers of
//! [`super::nbd_servers`]: 4 KiB random reads and writes at queue depth 1 and 32 on one
//! connection, and random reads by 4 jobs on 4 connections at depth 32 each (the load
//! multi-conn is for). Unlike `qemu-img bench`, fio keeps its queue full without sleeping
//! between requests. Requests/s from fio's own run time, and the server process's CPU time
//! per request.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::nbd_servers::{Fleet, ProcCpu, Running, SERVERS, up};
use super::{Ctx, Row, System};
use crate::measure::{Metric, Sample};

#[derive(Clone, Copy, Debug)]
pub(super) struct Case {
    pub(super) rw: &'static str,
    pub(super) depth: u32,
    pub(super) jobs: u32,
    /// Requests of all jobs together.
    pub(super) requests: u64,
}

impl Case {
    /// The row's name, `PREFIX-RW-4k-qdD` (or `-JxD` for several jobs).
    pub(super) fn name_in(&self, prefix: &str) -> String {
        if self.jobs > 1 {
            format!("{prefix}-{}-4k-{}x{}", self.rw, self.jobs, self.depth)
        } else {
            format!("{prefix}-{}-4k-qd{}", self.rw, self.depth)
        }
    }

    fn name(&self) -> String {
        self.name_in("nbd-fio")
    }
}

/// Whether fio is installed with its NBD engine.
pub fn available() -> bool {
    Command::new("fio")
        .arg("--enghelp=nbd")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One fio run of `case` over the first `size` of `srv`'s export with fio's NBD engine (see
/// [`fio`]).
pub(super) fn client_run(srv: &Running, case: Case, size: &str) -> Sample {
    let target = ["--ioengine=nbd".to_string(), format!("--uri={}", srv.url)];
    fio(&target, &srv.client_env, Some(srv.proc_cpu()), case, size)
}

/// One fio run of `case` over `size` of `target` (the engine and what it opens): requests/s
/// over fio's run time, and `srv`'s CPU per request when given. Checks that fio did every
/// request it was given, without an error. Writes carry fio's checksums
/// (`--verify=crc32c`), and a second fio run, after the timed one and outside the server's
/// CPU count, reads every written block back and checks it (`--verify_only`).
pub(super) fn fio(
    target: &[String],
    env: &[(String, String)],
    srv: Option<&ProcCpu>,
    case: Case,
    size: &str,
) -> Sample {
    let per_job = case.requests / u64::from(case.jobs);
    let write = case.rw.contains("write");
    let mut args = vec!["--name=bench".to_string()];
    args.extend_from_slice(target);
    args.extend([
        format!("--rw={}", case.rw),
        "--bs=4k".into(),
        format!("--iodepth={}", case.depth),
        format!("--numjobs={}", case.jobs),
        format!("--size={size}"),
        format!("--io_size={}", per_job * 4096),
        "--output-format=json".into(),
    ]);
    if case.rw == "randrw" {
        // The 70/30 mix: its writes are checked by the scenario (fio cannot verify a mix).
        args.push("--rwmixread=70".into());
    } else if write {
        args.extend([
            "--verify=crc32c".into(),
            "--do_verify=0".into(),
            "--verify_fatal=1".into(),
            // (No state file left in the working directory.)
            "--verify_state_save=0".into(),
        ]);
    }
    let cpu0 = srv.map(ProcCpu::cpu);
    let env = env.iter().map(|(k, v)| (k, v));
    let out = dies_with_us(Command::new("fio").args(&args).envs(env.clone()))
        .output()
        .expect("run fio");
    let cpu = srv.zip(cpu0).map(|(s, c0)| s.cpu().since(c0));
    if write && case.rw != "randrw" && out.status.success() {
        let mut verify = args.clone();
        verify.push("--verify_only".into());
        let v = dies_with_us(Command::new("fio").args(&verify))
            .envs(env)
            .output()
            .expect("run fio's verify");
        assert!(
            v.status.success(),
            "fio found blocks it wrote changed when read back: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio {args:?} failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // fio's engine prints a line of its own before the JSON.
    let json = &text[text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio: {text}"))..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio's JSON output");
    let jobs = v["jobs"].as_array().expect("fio's jobs");
    assert_eq!(jobs.len(), case.jobs as usize, "one result per job");
    let dir = if write { "write" } else { "read" };
    // The jobs run at once: all their requests over the longest job's run time.
    let (mut ios, mut runtime_ms) = (0, 1);
    for job in jobs {
        assert_eq!(
            job["error"].as_u64(),
            Some(0),
            "fio reported an error: {job}"
        );
        let done: u64 = ["read", "write"]
            .iter()
            .filter(|d| case.rw == "randrw" || **d == dir)
            .map(|d| job[*d]["total_ios"].as_u64().expect("total_ios"))
            .sum();
        assert_eq!(done, per_job, "fio did every request");
        ios += per_job;
        let ran = ["read", "write"]
            .iter()
            .filter_map(|d| job[*d]["runtime"].as_u64())
            .max()
            .expect("runtime");
        runtime_ms = runtime_ms.max(ran);
    }
    let sample = Sample::timed(Metric::OpsPerSec, ios, Duration::from_millis(runtime_ms));
    match cpu {
        Some(cpu) => sample.with_cpu_of(cpu, ios),
        None => sample,
    }
}

/// `cmd`, made to die with this process (`PR_SET_PDEATHSIG`): a scenario killed at its time
/// limit must not leave a fio running (one did, a CPU busy for an hour under the rows after it).
fn dies_with_us(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe, called in the child between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

pub fn run(ctx: &Ctx) -> Vec<Row> {
    assert!(
        available() && super::nbd_servers::available(),
        "the nbd-fio scenario needs fio (with its nbd engine), qemu-storage-daemon, qemu-nbd, \
         nbdkit and nbdcopy on the PATH (Debian/Ubuntu: apt-get install fio qemu-utils nbdkit \
         libnbd-bin)"
    );
    let dir = Path::new("target").join("bench-data");
    std::fs::create_dir_all(&dir).expect("create target/bench-data");
    let cases = [
        ("randread", 1, 1, ctx.scale(40_000, 3_000)),
        ("randread", 32, 1, ctx.scale(200_000, 15_000)),
        ("randwrite", 1, 1, ctx.scale(40_000, 3_000)),
        ("randwrite", 32, 1, ctx.scale(100_000, 8_000)),
        ("randread", 32, 4, ctx.scale(400_000, 20_000)),
    ]
    .map(|(rw, depth, jobs, requests)| Case {
        rw,
        depth,
        jobs,
        requests,
    });
    // Every server running for the whole scenario, each with a file of its own (QEMU's
    // servers lock their image), so that each row's runs go in rounds over the servers (see
    // `Ctx::interleave`).
    let mut fleet = Fleet::default();
    for server in SERVERS {
        let system = server.system();
        let path = dir.join(format!("nbd-fio-64M-{system}.img"));
        fleet.start(system, server, path, None);
    }
    let mut rows = Vec::new();
    for case in cases {
        let systems = fleet
            .servers
            .iter()
            .map(|(system, path, srv)| {
                System::new(system.as_str(), move || {
                    let srv = up(system, srv);
                    let sample = client_run(srv, case, "64M");
                    if case.rw == "randread" {
                        super::nbd_servers::check_reads(srv, path, system);
                    }
                    sample
                })
            })
            .collect();
        rows.extend(ctx.interleave(&case.name(), Metric::OpsPerSec, systems));
    }
    rows
}
