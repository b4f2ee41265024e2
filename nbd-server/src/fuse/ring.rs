//! The io_uring FUSE transport (Linux 6.14+): ring entries registered on `/dev/fuse` with
//! `IORING_OP_URING_CMD` from the serving IoThread's own ring (`FUSE_IO_URING_CMD_REGISTER`);
//! the kernel completes an entry when it has put a request in it, and the reply goes back
//! with the entry's next fetch in one command (`FUSE_IO_URING_CMD_COMMIT_AND_FETCH`): no
//! `read` or `write` system call per request.
//!
//! The kernel keeps one queue per possible CPU and puts a request on the queue of the CPU its
//! caller runs on; every queue needs entries before the kernel uses the ring at all. Queue
//! `q` is served by IoThread `q % n`, which registers [`DEPTH`] entries for it.
//!
//! An entry's buffers belong to the command in flight: each submission's completion callback
//! owns the entry, so the reactor keeps them while the kernel may write them, and drops them
//! only after the command's last completion. The kernel cannot cancel a parked entry
//! (`IORING_OP_ASYNC_CANCEL` does not reach FUSE commands): entries end when the connection
//! does (unmount or abort: `-ENOTCONN`), which is how the export stops them.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use reactor::io_uring::{opcode, squeue::Entry128, types};
use reactor::{Completion, Reactor};

use super::abi::{self, Pod, uring};
use super::fs::{Fs, Reply};
use crate::direct::AlignedPool;

/// Entries registered per queue: requests one queue serves at once.
pub(crate) const DEPTH: usize = 32;

/// The entries one IoThread registers for one queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueSpec {
    /// The queue (a possible CPU's number).
    pub(crate) qid: u16,
    /// Entries: requests of this queue this IoThread serves at once.
    pub(crate) depth: usize,
    /// Each entry's payload buffer (at least the negotiated `max_write`).
    pub(crate) payload_size: usize,
}

/// One ring entry: the request header buffer and the payload buffer the kernel reads and
/// writes, and the iovecs that name them.
struct Entry {
    /// `struct fuse_uring_req_header` (288 bytes), 8-byte aligned.
    header: Box<[u64; uring::HEADER_SIZE / 8]>,
    /// The payload: a WRITE's data in, a READ's data (and every reply's arguments) out. Its
    /// heap block never moves: it is only ever cleared and refilled within its capacity.
    payload: Vec<u8>,
    iov: Box<[libc::iovec; 2]>,
}

/// What one IoThread's queues share.
struct Queue {
    fs: Arc<Fs>,
    dev: OwnedFd,
    qid: u16,
    payload_size: usize,
    pool: AlignedPool,
    /// Entries still registered, over the whole export.
    export_live: Arc<AtomicUsize>,
}

impl Entry {
    fn new(payload_size: usize) -> Box<Entry> {
        let mut e = Box::new(Entry {
            header: Box::new([0u64; uring::HEADER_SIZE / 8]),
            payload: Vec::with_capacity(payload_size),
            iov: Box::new(
                [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 2],
            ),
        });
        e.iov[0] = libc::iovec {
            iov_base: e.header.as_mut_ptr().cast(),
            iov_len: uring::HEADER_SIZE,
        };
        e.iov[1] = libc::iovec {
            iov_base: e.payload.as_mut_ptr().cast(),
            iov_len: e.payload.capacity(),
        };
        e
    }

    fn header(&self) -> &[u8] {
        // SAFETY: the array's bytes, read as bytes.
        unsafe { std::slice::from_raw_parts(self.header.as_ptr().cast::<u8>(), uring::HEADER_SIZE) }
    }

    fn header_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, written as bytes (any bytes are valid u64s).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.header.as_mut_ptr().cast::<u8>(),
                uring::HEADER_SIZE,
            )
        }
    }
}

/// Registers [`DEPTH`] entries for queue `qid` on `r`'s ring (which takes 128-byte SQEs), on
/// the connection of `dev` (a duplicate of the export's `/dev/fuse` fd). `export_live`
/// counts the export's registered entries: it falls to 0 once the connection has ended them
/// all.
///
/// # Errors
/// A ring of 64-byte SQEs (`Unsupported`), or the submission's error; entries registered
/// before the error stay registered (the connection's end ends them).
pub(crate) fn start_queue(
    r: &Reactor,
    fs: Arc<Fs>,
    dev: OwnedFd,
    spec: QueueSpec,
    export_live: Arc<AtomicUsize>,
) -> io::Result<()> {
    let QueueSpec {
        qid,
        depth,
        payload_size,
    } = spec;
    let q = Rc::new(Queue {
        fs,
        dev,
        qid,
        payload_size,
        pool: AlignedPool::default(),
        export_live,
    });
    for _ in 0..depth {
        submit(r, &q, Entry::new(q.payload_size), uring::CMD_REGISTER, 0)?;
    }
    Ok(())
}

/// Submits `cmd` for entry `e` of queue `q` (REGISTER, or COMMIT_AND_FETCH of `commit_id`);
/// its completion brings the entry's next request.
fn submit(
    r: &Reactor,
    q: &Rc<Queue>,
    mut e: Box<Entry>,
    cmd: u32,
    commit_id: u64,
) -> io::Result<()> {
    // The payload's block is where the kernel writes (its capacity never changes).
    e.iov[1].iov_base = e.payload.as_mut_ptr().cast();
    let sqe = command(q.dev.as_raw_fd(), cmd, q.qid, commit_id, e.iov.as_ptr());
    let (q2, mut held) = (q.clone(), Some(e));
    // SAFETY: the command refers to the entry's iovecs and the buffers they name, and to the
    // `/dev/fuse` fd; the callback owns the entry (dropped only after the last completion)
    // and the queue, which owns the fd.
    let res = unsafe {
        r.submit_sqe128(sqe, move |r, c| {
            if let Some(e) = held.take() {
                completed(r, &q2, e, c);
            }
        })
    };
    if res.is_ok() {
        // Relaxed: a count read by the stopping thread only to know when to stop waiting;
        // the entries' memory is this thread's.
        q.export_live.fetch_add(1, Ordering::Relaxed);
    }
    res.map(|_| ())
}

/// A command of entry `e` completed: a request is in it, or the entry has ended.
fn completed(r: &Reactor, q: &Rc<Queue>, e: Box<Entry>, c: Completion) {
    q.export_live.fetch_sub(1, Ordering::Relaxed);
    if c.result < 0 {
        // -ENOTCONN: unmounted or aborted; the entry (and its buffers) goes.
        if c.result != -libc::ENOTCONN {
            tracing::warn!(
                qid = q.qid,
                error = %io::Error::from_raw_os_error(-c.result),
                "fuse: a ring entry ended"
            );
        }
        return;
    }
    let Some(h) = abi::InHeader::read(e.header()) else {
        unreachable!("the header buffer holds 288 bytes");
    };
    let hdr = e.header();
    let payload_sz = u32::from_le_bytes(
        hdr[uring::PAYLOAD_SZ_AT..uring::PAYLOAD_SZ_AT + 4]
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    let commit_id = u64::from_le_bytes(
        hdr[uring::COMMIT_ID_AT..uring::COMMIT_ID_AT + 8]
            .try_into()
            .expect("8 bytes"),
    );
    let mut arg = [0u8; uring::OP_IN_SIZE];
    arg.copy_from_slice(&hdr[uring::OP_IN_AT..uring::OP_IN_AT + uring::OP_IN_SIZE]);
    let arg_len = super::classic::first_arg_len(h.opcode);
    // Relaxed: statistics.
    q.fs.stats.ring_requests.fetch_add(1, Ordering::Relaxed);
    let q = q.clone();
    let task = async move {
        let mut e = e;
        let mut payload = std::mem::take(&mut e.payload);
        // SAFETY: the kernel wrote `payload_sz` bytes (at most the capacity it was given).
        unsafe { payload.set_len(payload_sz.min(payload.capacity())) };
        let data = 0..payload.len();
        let (reply, payload) =
            q.fs.serve(&h, &arg[..arg_len], payload, data, &q.pool)
                .await;
        e.payload = payload;
        write_reply(&mut e, h.unique, reply);
        let res =
            Reactor::with_current(|r| submit(r, &q, e, uring::CMD_COMMIT_AND_FETCH, commit_id))
                .expect("the task runs on the queue's reactor");
        if let Err(err) = res {
            tracing::warn!(qid = q.qid, error = %err, "fuse: a ring entry could not be re-armed");
        }
    };
    r.spawn_local(task).detach();
}

/// Puts the reply to `unique` in the entry: the out header in `in_out`, its size in
/// `payload_sz` (its bytes are the payload's first `len`).
fn write_reply(e: &mut Entry, unique: u64, reply: Reply) {
    let len = if reply.error == 0 { reply.len } else { 0 };
    let out = abi::OutHeader {
        len: (std::mem::size_of::<abi::OutHeader>() + len) as u32,
        error: -reply.error,
        unique,
    };
    let hdr = e.header_mut();
    hdr[..16].copy_from_slice(out.bytes());
    hdr[uring::PAYLOAD_SZ_AT..uring::PAYLOAD_SZ_AT + 4]
        .copy_from_slice(&(len as u32).to_le_bytes());
}

/// The SQE of a FUSE ring command: `URING_CMD` on the `/dev/fuse` fd with the 24-byte
/// `fuse_uring_cmd_req` in its command area, `addr` the entry's two iovecs and `len` 2.
fn command(dev: i32, cmd: u32, qid: u16, commit_id: u64, iov: *const libc::iovec) -> Entry128 {
    let req = abi::UringCmdReq {
        flags: 0,
        commit_id,
        qid,
        padding: [0; 6],
    };
    let mut area = [0u8; 80];
    area[..24].copy_from_slice(req.bytes());
    let sqe = opcode::UringCmd80::new(types::Fd(dev), cmd)
        .cmd(area)
        .addr(Some(iov as u64))
        .build();
    with_len(sqe, 2)
}

/// `sqe` with its `len` field (bytes 24..28 of the SQE) set: `UringCmd80` has no setter for
/// it, and FUSE's REGISTER reads the iovec count there.
fn with_len(sqe: Entry128, len: u32) -> Entry128 {
    const _: () = assert!(std::mem::size_of::<Entry128>() == 128);
    // SAFETY: `Entry128` is `repr(C)`: the kernel's 128-byte SQE, plain bytes.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&len.to_le_bytes());
    // SAFETY: as above; any bytes make an SQE value (the kernel validates it).
    unsafe { std::mem::transmute::<[u8; 128], Entry128>(raw) }
}

/// How many queues the kernel keeps: one per possible CPU (`/sys/devices/system/cpu/possible`,
/// e.g. `0-1` or `0-3,8-11`).
///
/// # Errors
/// The file cannot be read or parsed.
pub(crate) fn possible_cpus() -> io::Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list(s.trim()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse the CPU list {s:?}"),
        )
    })
}

/// The highest CPU number plus one, from a kernel CPU list.
fn parse_cpu_list(s: &str) -> Option<usize> {
    let mut max = None;
    for part in s.split(',') {
        let last = part.rsplit('-').next()?;
        let n: usize = last.parse().ok()?;
        max = Some(max.map_or(n, |m: usize| m.max(n)));
    }
    max.map(|m| m + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0-3,8-11"), Some(12));
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn a_command_carries_its_request_where_the_kernel_reads_it() {
        let iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        let sqe = command(7, uring::CMD_COMMIT_AND_FETCH, 1, 0xabcd, iov.as_ptr());
        // SAFETY: plain bytes, as in `with_len`.
        let raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(raw[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(i32::from_le_bytes(raw[4..8].try_into().unwrap()), 7, "fd");
        assert_eq!(
            u32::from_le_bytes(raw[8..12].try_into().unwrap()),
            uring::CMD_COMMIT_AND_FETCH
        );
        assert_eq!(
            u64::from_le_bytes(raw[16..24].try_into().unwrap()),
            iov.as_ptr() as u64
        );
        assert_eq!(
            u32::from_le_bytes(raw[24..28].try_into().unwrap()),
            2,
            "two iovecs"
        );
        assert_eq!(
            u64::from_le_bytes(raw[56..64].try_into().unwrap()),
            0xabcd,
            "commit_id"
        );
        assert_eq!(
            u16::from_le_bytes(raw[64..66].try_into().unwrap()),
            1,
            "qid"
        );
    }
}
