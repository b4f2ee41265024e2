//! Mounting the export by the daemon itself (root, `mount(2)` with a `/dev/fuse` fd; no
//! `fusermount3`), and taking it down again.
//!
//! The export is one regular file, mounted over a regular file (the mountpoint), as
//! `qemu-storage-daemon --export type=fuse` does: the file system's root *is* the image.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The mountpoint checked: it exists, is a regular file, and nothing is mounted on it.
///
/// # Errors
/// `NotFound` for a missing mountpoint, `InvalidInput` for a directory or another kind of
/// file, `ResourceBusy` when something (another daemon's export, say) is mounted there.
pub(crate) fn check_mountpoint(path: &Path) -> io::Result<PathBuf> {
    let say = |kind: io::ErrorKind, what: &str| {
        io::Error::new(kind, format!("--fuse {}: {what}", path.display()))
    };
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => say(
            io::ErrorKind::NotFound,
            "no such file: create a regular file there first (the export is mounted over it)",
        ),
        _ => say(e.kind(), &e.to_string()),
    })?;
    if !meta.is_file() {
        return Err(say(
            io::ErrorKind::InvalidInput,
            "not a regular file (the export is one file, mounted over a regular file)",
        ));
    }
    let canonical = std::fs::canonicalize(path)?;
    if let Some(fstype) = mounted_on(&canonical)? {
        return Err(say(
            io::ErrorKind::ResourceBusy,
            &format!(
                "busy: a {fstype} file system is mounted there already (another export?); \
                 unmount it first (umount {})",
                canonical.display()
            ),
        ));
    }
    Ok(canonical)
}

/// The type of what is mounted on `path` (a canonical path), from `/proc/self/mountinfo`.
fn mounted_on(path: &Path) -> io::Result<Option<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let want = path.as_os_str().as_bytes();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(point) = fields.get(4) else { continue };
        if unescape(point) == want {
            // After the optional fields, " - " then the type.
            let fstype = line
                .split(" - ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .unwrap_or("?");
            return Ok(Some(fstype.to_owned()));
        }
    }
    Ok(None)
}

/// The device number (`major:minor`) of what is mounted on `path` (a canonical path), from
/// `/proc/self/mountinfo`: the top mount there, without a stat (which, on a FUSE mount not
/// yet initialised, would wait for its INIT).
///
/// # Errors
/// Nothing is mounted there (`NotFound`), or mountinfo cannot be read.
pub(crate) fn device_of(path: &Path) -> io::Result<u64> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let want = path.as_os_str().as_bytes();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.get(4).is_some_and(|p| unescape(p) == want) {
            found = fields
                .get(2)
                .and_then(|d| d.split_once(':'))
                .and_then(|(ma, mi)| Some(libc::makedev(ma.parse().ok()?, mi.parse().ok()?)));
        }
    }
    found.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("nothing mounted on {}", path.display()),
        )
    })
}

/// A mountinfo path with its octal escapes (`\040` for a space) undone.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Opens `/dev/fuse` (non-blocking: its reads are driven by the reactor).
///
/// # Errors
/// The open's error, explained (no FUSE module, not root).
pub(crate) fn open_dev() -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("/dev/fuse: {e} (FUSE exports need the fuse module and root)"),
            )
        })?;
    Ok(f.into())
}

/// Mounts the FUSE connection of `dev` on `path` (a checked mountpoint): a regular-file root,
/// readable and writable by everyone the file's mode allows (`allow_other`,
/// `default_permissions`), read-only when asked.
///
/// # Errors
/// `mount(2)`'s error, with the mountpoint named.
pub(crate) fn mount(dev: &OwnedFd, path: &Path, read_only: bool) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    let data = CString::new(format!(
        "fd={},rootmode=100000,user_id=0,group_id=0,allow_other,default_permissions",
        dev.as_raw_fd()
    ))?;
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: NUL-terminated strings that live across the call.
    let rc = unsafe {
        libc::mount(
            c"nbd-server".as_ptr(),
            target.as_ptr(),
            c"fuse.nbd-server".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mount of the FUSE export on {}: {e}", path.display()),
        ));
    }
    Ok(())
}

/// Unmounts `path`: a plain unmount, or, while users hold the file open (`EBUSY`), a lazy
/// one (`MNT_DETACH`: the mount leaves the tree now, and the connection ends when the last
/// user closes it). Returns whether the unmount was lazy.
///
/// # Errors
/// `umount2`'s error (`EINVAL`: nothing is mounted there any more).
pub(crate) fn unmount(path: &Path) -> io::Result<bool> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path that lives across the calls.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return Ok(false);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EBUSY) {
        return Err(e);
    }
    // SAFETY: as above.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(true);
    }
    Err(io::Error::last_os_error())
}

/// Aborts the FUSE connection whose device number is `dev` (the mount's `st_dev`) through
/// the fuse control file system (`/sys/fs/fuse/connections/N/abort`), mounting it there
/// first if it is not: every request waiting ends with `ENOTCONN`, and so does every ring
/// entry parked in the kernel.
///
/// # Errors
/// The control file system cannot be mounted, or the connection is gone already (`NotFound`).
pub(crate) fn abort(dev: u64) -> io::Result<()> {
    let dir = Path::new("/sys/fs/fuse/connections");
    let conn = dir.join(format!("{}", libc::minor(dev)));
    if !conn.exists() && mounted_on(dir)?.is_none() {
        // SAFETY: NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"fusectl".as_ptr(),
                c"/sys/fs/fuse/connections".as_ptr(),
                c"fusectl".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    std::fs::write(conn.join("abort"), b"1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), b"/a b");
        assert_eq!(unescape(r"/plain"), b"/plain");
        assert_eq!(unescape(r"/end\"), b"/end\\");
    }

    #[test]
    fn a_missing_or_wrong_mountpoint_is_a_clear_error() {
        let e = check_mountpoint(Path::new("/nonexistent/export")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("create a regular file"), "{e}");
        let e = check_mountpoint(Path::new("/tmp")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // `/proc` is a mountpoint, but a directory: the directory check comes first. A file
        // that is a mountpoint: `/etc/resolv.conf` often is in containers; not relied on.
        let e = check_mountpoint(Path::new("/proc")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
