//! The FUSE wire format (the kernel's `include/uapi/linux/fuse.h`, protocol 7.45): the
//! structures this daemon reads and writes, each checked against the kernel's size at compile
//! time, and the opcodes and flags it uses. Written here rather than taken from a crate: the
//! FUSE crates own their transport (a blocking `/dev/fuse` loop), and this one needs only the
//! bytes, in buffers it owns (see the module docs of `fuse`).

#![allow(dead_code)] // The ABI is written out whole; not every field is read.

/// Protocol major version.
pub(crate) const KERNEL_VERSION: u32 = 7;
/// Protocol minor version this daemon speaks (the kernel takes the smaller of its own and
/// this).
pub(crate) const KERNEL_MINOR_VERSION: u32 = 45;
/// The smallest buffer a `/dev/fuse` read may use.
pub(crate) const MIN_READ_BUFFER: usize = 8192;
/// The root's node id.
pub(crate) const ROOT_ID: u64 = 1;

/// Opcodes (`enum fuse_opcode`).
pub(crate) mod op {
    pub(crate) const LOOKUP: u32 = 1;
    pub(crate) const FORGET: u32 = 2;
    pub(crate) const GETATTR: u32 = 3;
    pub(crate) const SETATTR: u32 = 4;
    pub(crate) const OPEN: u32 = 14;
    pub(crate) const READ: u32 = 15;
    pub(crate) const WRITE: u32 = 16;
    pub(crate) const STATFS: u32 = 17;
    pub(crate) const RELEASE: u32 = 18;
    pub(crate) const FSYNC: u32 = 20;
    pub(crate) const FLUSH: u32 = 25;
    pub(crate) const INIT: u32 = 26;
    pub(crate) const OPENDIR: u32 = 27;
    pub(crate) const ACCESS: u32 = 34;
    pub(crate) const INTERRUPT: u32 = 36;
    pub(crate) const DESTROY: u32 = 38;
    pub(crate) const BATCH_FORGET: u32 = 42;
    pub(crate) const FALLOCATE: u32 = 43;
    pub(crate) const LSEEK: u32 = 46;
    pub(crate) const SYNCFS: u32 = 50;
    pub(crate) const STATX: u32 = 52;
}

/// `FUSE_INIT` flags (the 64-bit set: `flags | flags2 << 32`).
pub(crate) mod init {
    pub(crate) const ASYNC_READ: u64 = 1 << 0;
    pub(crate) const ATOMIC_O_TRUNC: u64 = 1 << 3;
    pub(crate) const BIG_WRITES: u64 = 1 << 5;
    pub(crate) const ASYNC_DIO: u64 = 1 << 15;
    pub(crate) const MAX_PAGES: u64 = 1 << 22;
    pub(crate) const INIT_EXT: u64 = 1 << 30;
    pub(crate) const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;
    pub(crate) const OVER_IO_URING: u64 = 1 << 41;
}

/// `fuse_open_out.open_flags`.
pub(crate) mod fopen {
    /// Bypass the page cache for this open file.
    pub(crate) const DIRECT_IO: u32 = 1 << 0;
    /// Concurrent direct writes on the same inode.
    pub(crate) const PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
}

/// `fuse_setattr_in.valid`.
pub(crate) mod fattr {
    pub(crate) const MODE: u32 = 1 << 0;
    pub(crate) const UID: u32 = 1 << 1;
    pub(crate) const GID: u32 = 1 << 2;
    pub(crate) const SIZE: u32 = 1 << 3;
    pub(crate) const ATIME: u32 = 1 << 4;
    pub(crate) const MTIME: u32 = 1 << 5;
    pub(crate) const FH: u32 = 1 << 6;
    pub(crate) const ATIME_NOW: u32 = 1 << 7;
    pub(crate) const MTIME_NOW: u32 = 1 << 8;
    pub(crate) const LOCKOWNER: u32 = 1 << 9;
    pub(crate) const CTIME: u32 = 1 << 10;
    pub(crate) const KILL_SUIDGID: u32 = 1 << 11;
}

/// `fuse_fsync_in.fsync_flags`: data only.
pub(crate) const FSYNC_FDATASYNC: u32 = 1 << 0;

/// FUSE over io_uring: `enum fuse_uring_cmd` and the entry header's layout.
pub(crate) mod uring {
    pub(crate) const CMD_REGISTER: u32 = 1;
    pub(crate) const CMD_COMMIT_AND_FETCH: u32 = 2;
    /// `struct fuse_uring_req_header`: `in_out` (128 bytes: the in or out header), `op_in`
    /// (128: the opcode's first argument), `ring_ent_in_out` (32).
    pub(crate) const HEADER_SIZE: usize = 288;
    pub(crate) const OP_IN_AT: usize = 128;
    pub(crate) const OP_IN_SIZE: usize = 128;
    /// `ring_ent_in_out.commit_id`.
    pub(crate) const COMMIT_ID_AT: usize = 256 + 8;
    /// `ring_ent_in_out.payload_sz`.
    pub(crate) const PAYLOAD_SZ_AT: usize = 256 + 16;
}

/// Plain-old-data structures of the protocol: every bit pattern is a valid value, so they are
/// read from and written to byte buffers as they are.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs of integers without padding.
pub(crate) unsafe trait Pod: Copy + Default {
    /// The value at the start of `b`, or `None` when `b` is too short.
    fn read(b: &[u8]) -> Option<Self> {
        if b.len() < std::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: `b` holds at least size_of::<Self>() bytes, and any bytes are a valid Self.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) })
    }

    /// The value's bytes.
    fn bytes(&self) -> &[u8] {
        // SAFETY: a padding-free repr(C) value is size_of::<Self>() initialised bytes.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                std::mem::size_of::<Self>(),
            )
        }
    }
}

macro_rules! pod {
    ($($(#[$m:meta])* struct $name:ident ($size:expr) { $($field:ident: $ty:ty),* $(,)? })*) => {$(
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub(crate) struct $name { $(pub(crate) $field: $ty),* }
        const _: () = assert!(std::mem::size_of::<$name>() == $size, "the kernel's size");
        // SAFETY: repr(C), integers only, and the size check above rules out padding (each
        // struct's fields are laid out naturally aligned, as the kernel's are).
        unsafe impl Pod for $name {}
    )*};
}

pod! {
    /// `struct fuse_in_header`: what every request starts with.
    struct InHeader (40) {
        len: u32, opcode: u32, unique: u64, nodeid: u64,
        uid: u32, gid: u32, pid: u32, total_extlen: u16, padding: u16,
    }
    /// `struct fuse_out_header`: what every reply starts with.
    struct OutHeader (16) { len: u32, error: i32, unique: u64 }
    /// `struct fuse_init_in`.
    struct InitIn (64) {
        major: u32, minor: u32, max_readahead: u32, flags: u32, flags2: u32,
        unused: [u32; 11],
    }
    /// `struct fuse_init_out`.
    struct InitOut (64) {
        major: u32, minor: u32, max_readahead: u32, flags: u32,
        max_background: u16, congestion_threshold: u16, max_write: u32, time_gran: u32,
        max_pages: u16, map_alignment: u16, flags2: u32, max_stack_depth: u32,
        request_timeout: u16, unused: [u16; 11],
    }
    /// `struct fuse_attr`.
    struct Attr (88) {
        ino: u64, size: u64, blocks: u64, atime: u64, mtime: u64, ctime: u64,
        atimensec: u32, mtimensec: u32, ctimensec: u32, mode: u32, nlink: u32,
        uid: u32, gid: u32, rdev: u32, blksize: u32, flags: u32,
    }
    /// `struct fuse_attr_out`: the reply to GETATTR and SETATTR.
    struct AttrOut (104) { attr_valid: u64, attr_valid_nsec: u32, dummy: u32, attr: Attr }
    /// `struct fuse_getattr_in`.
    struct GetattrIn (16) { getattr_flags: u32, dummy: u32, fh: u64 }
    /// `struct fuse_setattr_in`.
    struct SetattrIn (88) {
        valid: u32, padding: u32, fh: u64, size: u64, lock_owner: u64,
        atime: u64, mtime: u64, ctime: u64, atimensec: u32, mtimensec: u32, ctimensec: u32,
        mode: u32, unused4: u32, uid: u32, gid: u32, unused5: u32,
    }
    /// `struct fuse_open_in`.
    struct OpenIn (8) { flags: u32, open_flags: u32 }
    /// `struct fuse_open_out`.
    struct OpenOut (16) { fh: u64, open_flags: u32, backing_id: i32 }
    /// `struct fuse_release_in`.
    struct ReleaseIn (24) { fh: u64, flags: u32, release_flags: u32, lock_owner: u64 }
    /// `struct fuse_read_in`.
    struct ReadIn (40) {
        fh: u64, offset: u64, size: u32, read_flags: u32, lock_owner: u64, flags: u32,
        padding: u32,
    }
    /// `struct fuse_write_in`: followed by the data.
    struct WriteIn (40) {
        fh: u64, offset: u64, size: u32, write_flags: u32, lock_owner: u64, flags: u32,
        padding: u32,
    }
    /// `struct fuse_write_out`.
    struct WriteOut (8) { size: u32, padding: u32 }
    /// `struct fuse_fsync_in`.
    struct FsyncIn (16) { fh: u64, fsync_flags: u32, padding: u32 }
    /// `struct fuse_fallocate_in`.
    struct FallocateIn (32) { fh: u64, offset: u64, length: u64, mode: u32, padding: u32 }
    /// `struct fuse_lseek_in`.
    struct LseekIn (24) { fh: u64, offset: u64, whence: u32, padding: u32 }
    /// `struct fuse_lseek_out`.
    struct LseekOut (8) { offset: u64 }
    /// `struct fuse_kstatfs` (the whole of `fuse_statfs_out`).
    struct StatfsOut (80) {
        blocks: u64, bfree: u64, bavail: u64, files: u64, ffree: u64,
        bsize: u32, namelen: u32, frsize: u32, padding: u32, spare: [u32; 6],
    }
    /// `struct fuse_interrupt_in`.
    struct InterruptIn (8) { unique: u64 }
    /// `struct fuse_uring_cmd_req`: the 24 bytes of a ring command in the SQE's command area.
    struct UringCmdReq (24) { flags: u64, commit_id: u64, qid: u16, padding: [u8; 6] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_round_trips_and_refuses_short_input() {
        let h = OutHeader {
            len: 16,
            error: -5,
            unique: 0x0102_0304_0506_0708,
        };
        let b = h.bytes().to_vec();
        assert_eq!(b.len(), 16);
        assert_eq!(OutHeader::read(&b), Some(h));
        assert_eq!(OutHeader::read(&b[..15]), None);
        // Unaligned input reads the same.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&b);
        assert_eq!(OutHeader::read(&shifted[1..]), Some(h));
        // The fields sit where the kernel puts them (little-endian x86_64/aarch64).
        assert_eq!(&b[4..8], &(-5i32).to_le_bytes());
        let c = UringCmdReq {
            qid: 3,
            commit_id: 9,
            ..Default::default()
        };
        assert_eq!(c.bytes()[16], 3);
        assert_eq!(c.bytes()[8], 9);
    }
}
