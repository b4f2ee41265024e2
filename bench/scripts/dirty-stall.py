#!/usr/bin/python3
"""How long an nbd-server IoThread stalls while a writer saturates dirty memory.

One IoThread serves two connections: a writer sending 1 MiB WRITEs (qemu-img bench, queue
depth 8) fast enough to keep the page cache at its dirty limit, and a reader doing one
request at a time: a 4 KiB READ of cached data, then a BLOCK_STATUS of the same range
(libnbd's Python bindings). The reader's latencies (p50, p99, max) are measured first alone,
then next to the writer. A buffered write that meets dirty-page throttling sleeps in the
kernel (balance_dirty_pages, up to 200 ms at a time) on whichever thread made it: the IoThread
itself for an inline write, a pool thread otherwise; and while it sleeps it holds the file's
inode lock, which BLOCK_STATUS's lseek(SEEK_DATA/SEEK_HOLE) takes too.

The dirty limits are lowered for the run (vm.dirty_bytes 256 MiB, dirty_background_bytes
64 MiB, restored afterwards: needs root) so that the writer reaches them in seconds on any
disk. Usage (from the workspace root, after `cargo build --release -p nbd-server`):

    /usr/bin/python3 bench/scripts/dirty-stall.py [--backend uring|epoll] [--seconds 10]
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import nbd

MiB = 1 << 20


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def fmt(xs):
    us = [x * 1e6 for x in xs]
    return "p50 %7.0f us  p99 %8.0f us  max %8.0f us  (%d requests)" % (
        percentile(us, 0.5), percentile(us, 0.99), max(us), len(us))


def reader(uri, seconds):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    reads, statuses = [], []
    end = time.monotonic() + seconds
    off = 0
    while time.monotonic() < end:
        t0 = time.monotonic()
        h.pread(4096, off)
        t1 = time.monotonic()
        h.block_status(4096, off, lambda *a: 0)
        t2 = time.monotonic()
        reads.append(t1 - t0)
        statuses.append(t2 - t1)
        off = (off + 4096) % (64 * MiB)
    h.shutdown()
    return reads, statuses


def sysctl(name, value=None):
    path = "/proc/sys/vm/" + name
    with open(path) as f:
        old = f.read().strip()
    if value is not None:
        with open(path, "w") as f:
            f.write(str(value))
    return old


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="uring")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--server", default="target/release/nbd-server")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="dirty-stall-", dir=os.environ.get("TMPDIR", "target"))
    img = os.path.join(d, "disk.img")
    with open(img, "wb") as f:
        f.truncate(4096 * MiB)
        f.write(os.urandom(64 * MiB))  # the reader's region, cached
    saved = (sysctl("dirty_bytes"), sysctl("dirty_background_bytes"),
             sysctl("dirty_ratio"), sysctl("dirty_background_ratio"))
    srv = subprocess.Popen([a.server, "--backend", a.backend, "--bind", "127.0.0.1:0",
                            "--iothreads", "1", img], stdout=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline()
        port = re.search(r":(\d+)$", line.strip()).group(1)
        uri = "nbd://127.0.0.1:%s/" % port
        alone = reader(uri, a.seconds)
        sysctl("dirty_background_bytes", 64 * MiB)
        sysctl("dirty_bytes", 256 * MiB)
        writer = subprocess.Popen(
            ["qemu-img", "bench", "-f", "raw", "-w", "-t", "none", "-s", "1M", "-d", "8",
             "-o", "64M", "-S", "1M", "-c", "1000000", uri],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)  # the writer reaches the dirty limit
        busy = reader(uri, a.seconds)
        writer.kill()
        writer.wait()
    finally:
        sysctl("dirty_bytes", saved[0]) if saved[0] != "0" else None
        sysctl("dirty_background_bytes", saved[1]) if saved[1] != "0" else None
        if saved[0] == "0":
            sysctl("dirty_ratio", saved[2])
        if saved[1] == "0":
            sysctl("dirty_background_ratio", saved[3])
        srv.terminate()
        srv.wait()
        os.remove(img)
        os.rmdir(d)
    print("backend %s, one IoThread" % a.backend)
    print("  READ 4 KiB, alone:               " + fmt(alone[0]))
    print("  BLOCK_STATUS 4 KiB, alone:       " + fmt(alone[1]))
    print("  READ 4 KiB, beside the writer:   " + fmt(busy[0]))
    print("  BLOCK_STATUS, beside the writer: " + fmt(busy[1]))


if __name__ == "__main__":
    sys.exit(main())
