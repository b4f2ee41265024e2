//! libnbd's Python bindings (`python3-libnbd`) against the `nbd-server` binary, on both
//! backends: `libnbd_check.py` drives every command and option through libnbd's strict
//! client and checks each reply against the file. The bindings must be installed for
//! Debian's own `/usr/bin/python3` (`apt-get install python3-libnbd`; `.ci/run` does it):
//! without them this test fails, it is not skipped.

mod common;

use std::os::unix::fs::FileExt;

use common::served::{random_bytes, run, scratch, serve};
use tests::backend_tests;

const MIB: u64 = 1 << 20;
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/libnbd_check.py");
/// The script's checks, one "ok" line each.
const CHECKS: usize = 11;

backend_tests! {
    fn libnbd_python_bindings_check_every_command_and_option(r: &Reactor) {
        let backend = &*r.backend().to_string();
        // Writes made by the IoThread (the default), and all handed to the pool.
        for extra in [&[][..], &["--no-inline-writes"]] {
            // 64 MiB whose only data is [4 MiB, 6 MiB): what the script expects.
            let export = scratch("libnbd-py", backend);
            let f = std::fs::File::create(&export).unwrap();
            f.set_len(64 * MIB).unwrap();
            f.write_all_at(&random_bytes(2 * MIB as usize, 7), 4 * MIB).unwrap();
            drop(f);
            let srv = serve(backend, &export, extra);
            let out = run("/usr/bin/python3", &[SCRIPT, &srv.url, export.to_str().unwrap()]);
            let passed = out.lines().filter(|l| l.starts_with("ok ")).count();
            assert_eq!(passed, CHECKS, "{extra:?}: {out}");
            drop(srv);
            std::fs::remove_file(export).unwrap();
        }
    }
}
