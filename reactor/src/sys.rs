//! The one way a raw system call's result becomes an `io::Result` here.

use std::io;

/// The integer types system calls return, where a negative value means "see `errno`".
pub(crate) trait SysInt: Copy {
    fn is_error(self) -> bool;
}

macro_rules! sys_int {
    ($($t:ty)*) => {$(
        impl SysInt for $t {
            #[inline]
            fn is_error(self) -> bool {
                self < 0
            }
        }
    )*};
}
sys_int!(i32 i64 isize);

/// `rc` if the call succeeded, else the error `errno` holds. Use it right after the call,
/// before anything else can change `errno`:
///
/// ```ignore
/// // SAFETY: ...
/// let n = cvt(unsafe { libc::read(fd, ptr, len) })?;
/// ```
#[inline]
pub(crate) fn cvt<T: SysInt>(rc: T) -> io::Result<T> {
    if rc.is_error() {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_is_errno_and_the_rest_passes() {
        assert_eq!(cvt(5i32).unwrap(), 5);
        assert_eq!(cvt(0isize).unwrap(), 0);
        // SAFETY: close of an fd number nobody uses fails with EBADF and touches nothing.
        let e = cvt(unsafe { libc::close(-1) }).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
