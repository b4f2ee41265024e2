//! The file operations that move no data: open, sync, space (`fallocate`) and advice
//! (`posix_fadvise`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::squeue::Entry;
use io_uring::{opcode, types};

use super::Op;
use crate::sys::cvt;

use super::file::FileFd;

/// `openat(AT_FDCWD, path, flags, mode)`.
pub(crate) struct Open {
    pub(crate) path: CString,
    pub(crate) flags: i32,
    pub(crate) mode: u32,
}

// SAFETY: the SQE and the call refer to the path, which the operation owns (a CString's bytes
// do not move with it).
unsafe impl Op for Open {
    type Output = io::Result<OwnedFd>;

    fn sqe(&mut self) -> Entry {
        opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), self.path.as_ptr())
            .flags(self.flags)
            .mode(self.mode)
            .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        // SAFETY: a valid C string for the call.
        cvt(unsafe { libc::open(self.path.as_ptr(), self.flags, self.mode) }).map(|fd| fd as usize)
    }

    fn moved(&self, _fd: usize) -> usize {
        0
    }

    fn complete(self, res: io::Result<usize>) -> io::Result<OwnedFd> {
        // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
        res.map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    fn orphan(self, fd: usize) {
        // SAFETY: the kernel gave this fd to an operation nobody collected; nothing else owns
        // it.
        drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
}

/// `fsync`, or `fdatasync` when `data_only`.
pub(crate) struct Fsync {
    pub(crate) fd: Arc<FileFd>,
    pub(crate) data_only: bool,
}

// SAFETY: refers to no memory; the Arc keeps the fd open.
unsafe impl Op for Fsync {
    type Output = io::Result<()>;

    fn sqe(&mut self) -> Entry {
        let flags = if self.data_only {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        opcode::Fsync::new(types::Fd(self.fd.as_raw_fd()))
            .flags(flags)
            .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: plain system calls on an open fd.
        let rc = unsafe {
            if self.data_only {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        };
        cvt(rc).map(|_| 0)
    }

    fn complete(self, res: io::Result<usize>) -> io::Result<()> {
        res.map(drop)
    }
}

/// `fallocate(fd, mode, offset, len)`.
pub(crate) struct Fallocate {
    pub(crate) fd: Arc<FileFd>,
    pub(crate) mode: i32,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

// SAFETY: refers to no memory; the Arc keeps the fd open.
unsafe impl Op for Fallocate {
    type Output = io::Result<()>;

    fn sqe(&mut self) -> Entry {
        opcode::Fallocate::new(types::Fd(self.fd.as_raw_fd()), self.len)
            .offset(self.offset)
            .mode(self.mode)
            .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        // SAFETY: a plain system call on an open fd; offset and length were checked to fit.
        let rc = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                self.mode,
                self.offset as i64,
                self.len as i64,
            )
        };
        cvt(rc).map(|_| 0)
    }

    fn complete(self, res: io::Result<usize>) -> io::Result<()> {
        res.map(drop)
    }
}

/// `posix_fadvise(fd, offset, len, advice)`.
pub(crate) struct Fadvise {
    pub(crate) fd: Arc<FileFd>,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) advice: i32,
}

// SAFETY: refers to no memory; the Arc keeps the fd open.
unsafe impl Op for Fadvise {
    type Output = io::Result<()>;

    fn sqe(&mut self) -> Entry {
        opcode::Fadvise::new(
            types::Fd(self.fd.as_raw_fd()),
            libc::off_t::from(self.len),
            self.advice,
        )
        .offset(self.offset)
        .build()
    }

    fn call(&mut self) -> io::Result<usize> {
        // SAFETY: a plain system call on an open fd; the offset was checked to fit.
        let rc = unsafe {
            libc::posix_fadvise(
                self.fd.as_raw_fd(),
                self.offset as i64,
                libc::off_t::from(self.len),
                self.advice,
            )
        };
        // posix_fadvise returns the error instead of setting errno.
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(0)
    }

    fn complete(self, res: io::Result<usize>) -> io::Result<()> {
        res.map(drop)
    }
}
