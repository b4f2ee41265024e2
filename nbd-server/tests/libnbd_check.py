"""libnbd's Python bindings against a running nbd-server, command by command.

Usage: libnbd_check.py URL FILE

URL serves FILE, a 64 MiB file whose only data is [4 MiB, 6 MiB); everything else is a
hole. libnbd checks the server's replies strictly (chunk offsets, flags, extents), and this
script checks what the replies say against FILE. Each check prints "ok NAME"; the first that
fails raises, which exits non-zero with a traceback. The Rust test
`nbd-server/tests/libnbd.rs` runs it on both backends and counts the "ok" lines.
"""

import errno
import os
import sys

import nbd

URL, FILE = sys.argv[1], sys.argv[2]
MIB = 1 << 20
SIZE = 64 * MIB
DATA = (4 * MIB, 2 * MIB)


def ok(name):
    print("ok", name, flush=True)


def connect(structured=True, contexts=("base:allocation",)):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    # An nbds:// URL names its key file or certificate directory.
    h.set_uri_allow_local_file(True)
    h.connect_uri(URL)
    return h


def file_bytes(offset, count):
    with open(FILE, "rb") as f:
        f.seek(offset)
        return f.read(count)


def read_chunks(h, count, offset, flags=0):
    """pread_structured: (data, [(offset, length, status)])."""
    chunks = []

    def chunk(subbuf, off, status, error):
        chunks.append((off, len(subbuf), status))
        return 0

    buf = h.pread_structured(count, offset, chunk, flags)
    return buf, sorted(chunks)


def extents(h, count, offset, flags=0):
    """block_status: [(length, flags)] for base:allocation."""
    seen = []

    def extent(context, off, entries, error):
        assert context == "base:allocation", context
        assert off == offset, (off, offset)
        seen.append(list(zip(entries[0::2], entries[1::2])))
        return 0

    h.block_status(count, offset, extent, flags)
    assert len(seen) == 1, seen
    return seen[0]


def expect_errno(code, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        # The bindings give the errno's name ("EINVAL"), not its number.
        assert e.errno == errno.errorcode[code], (e.errno, e.string)
        return
    raise AssertionError("no error from %s%r" % (f.__name__, args))


h = connect()
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.get_size() == SIZE
for can in ("can_multi_conn", "can_cache", "can_df", "can_fast_zero", "can_trim",
            "can_zero", "can_flush", "can_fua"):
    assert getattr(h, can)(), can
assert not h.is_read_only()
ok("negotiation: structured replies, base:allocation and every export flag")

# A READ across data and holes: chunks that cover it exactly once, holes where FILE has
# them, and FILE's bytes.
start, count = 3 * MIB, 4 * MIB
buf, chunks = read_chunks(h, count, start)
assert bytes(buf) == file_bytes(start, count)
at = start
for off, length, status in chunks:
    assert off == at, ("gap or overlap", chunks)
    inside = DATA[0] <= off < DATA[0] + DATA[1]
    assert status == (nbd.READ_DATA if inside else nbd.READ_HOLE), chunks
    at += length
assert at == start + count, chunks
assert [c[2] for c in chunks] == [nbd.READ_HOLE, nbd.READ_DATA, nbd.READ_HOLE], chunks
ok("structured read: hole and data chunks, exact and in place")

buf, chunks = read_chunks(h, count, start, nbd.CMD_FLAG_DF)
assert bytes(buf) == file_bytes(start, count)
assert chunks == [(start, count, nbd.READ_DATA)], chunks
ok("structured read with DF: one data chunk")

hole = nbd.STATE_HOLE | nbd.STATE_ZERO
assert extents(h, SIZE, 0) == [(DATA[0], hole), (DATA[1], 0),
                               (SIZE - DATA[0] - DATA[1], hole)]
assert extents(h, 3 * MIB, 4 * MIB) == [(2 * MIB, 0), (MIB, hole)]
assert extents(h, SIZE, 0, nbd.CMD_FLAG_REQ_ONE) == [(DATA[0], hole)]
ok("block status: the file's map, clipped to the request, REQ_ONE")

# Writes, flush, FUA, zeroes, trim and cache, each checked in the file.
payload = os.urandom(64 * 1024)
h.pwrite(payload, 8 * MIB)
h.flush()
h.pwrite(payload[::-1], 9 * MIB, nbd.CMD_FLAG_FUA)
assert file_bytes(8 * MIB, len(payload)) == payload
assert file_bytes(9 * MIB, len(payload)) == payload[::-1]
assert bytes(h.pread(len(payload), 8 * MIB)) == payload
ok("write, flush, FUA write: in the file and read back")

h.zero(MIB, DATA[0], nbd.CMD_FLAG_FAST_ZERO)
assert file_bytes(DATA[0], MIB) == bytes(MIB)
h.zero(64 * 1024, 8 * MIB, nbd.CMD_FLAG_NO_HOLE)
assert file_bytes(8 * MIB, 64 * 1024) == bytes(64 * 1024)
h.trim(MIB, DATA[0] + MIB)
assert bytes(h.pread(MIB, DATA[0] + MIB)) == bytes(MIB)
assert extents(h, 2 * MIB, DATA[0]) == [(2 * MIB, hole)]
h.cache(4 * MIB, 0)
h.cache(MIB, SIZE - MIB)
ok("write zeroes (fast, no hole), trim, cache")

# Errors come back in the reply and leave the connection in step.
h.set_strict_mode(0)
expect_errno(errno.EINVAL, h.pread, 4096, SIZE)
# The spec asks for ENOSPC on a write past the end.
expect_errno(errno.ENOSPC, h.pwrite, b"x" * 4096, SIZE - 1)
expect_errno(errno.EINVAL, h.cache, 64 * MIB, 0)
expect_errno(errno.EINVAL, h.block_status, 0, 0, lambda *a: 0)
assert bytes(h.pread(4096, 8 * MIB)) == bytes(4096)
ok("errors: EINVAL or ENOSPC for out-of-bounds commands, the stream in step")

# Many commands in flight on one connection.
data = os.urandom(64 * 4096)
h.pwrite(data, 16 * MIB)
bufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(b, 16 * MIB + i * 4096) for i, b in enumerate(bufs)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, (b, c) in enumerate(zip(bufs, cookies)):
    assert h.aio_command_completed(c)
    assert b.to_bytearray() == data[i * 4096:(i + 1) * 4096], i
ok("64 reads in flight on one connection")

# Multi-conn: what one connection wrote and flushed, another reads.
h2 = connect()
h2.pwrite(b"\xab" * 4096, 20 * MIB)
h2.flush()
assert bytes(h.pread(4096, 20 * MIB)) == b"\xab" * 4096
h2.shutdown()
ok("multi-conn: a second connection's write is read on the first")

h.shutdown()

# Option haggling: list the exports and the contexts, ask about one, then go.
o = nbd.NBD()
o.set_opt_mode(True)
o.set_uri_allow_local_file(True)
o.connect_uri(URL)
names = []
o.opt_list(lambda name, desc: names.append(name) or 0)
assert names == ["disk"], names
contexts = []  # no query: every context the export has
o.opt_list_meta_context(lambda name: contexts.append(name) or 0)
assert contexts == ["base:allocation"], contexts
o.set_export_name("nope")
expect_errno(errno.ENOENT, o.opt_info)
o.set_export_name("disk")
o.add_meta_context("base:allocation")
o.opt_info()
assert o.get_size() == SIZE
o.opt_go()
assert o.can_meta_context("base:allocation")
o.shutdown()
ok("option haggling: LIST, LIST_META_CONTEXT, INFO (unknown and known), GO")

# A client that does not ask for structured replies gets simple replies.
s = connect(structured=False)
assert not s.get_structured_replies_negotiated()
assert not s.can_df()
assert bytes(s.pread(MIB, 15 * MIB)) == file_bytes(15 * MIB, MIB)
s.shutdown()
ok("simple replies: no structured replies, no DF, reads as before")
