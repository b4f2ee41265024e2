//! Bad input gets a clear error, on both backends.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;

use reactor::{FdHandler, Interest};
use tests::{backend_tests, pipe};

fn reader() -> FdHandler {
    FdHandler::new().on_read(|_, _| {})
}

backend_tests! {
    fn invalid_fd_is_ebadf(r: &Reactor) {
        let e = r.add_fd(-1, reader()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        assert_eq!(r.fd_count(), 0);
    }

    fn closed_fd_is_ebadf(r: &Reactor) {
        // Tests run in parallel threads that open fds all the time, so a freshly closed low
        // number may be reused at once: close a high number that only this test uses.
        let (rd, wr) = pipe().unwrap();
        let base = if r.backend() == reactor::Backend::Uring { 800 } else { 900 };
        // SAFETY: F_DUPFD on a live fd; the result is checked and closed below.
        let fd = unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, base) };
        assert!(fd >= base);
        // SAFETY: `fd` is the duplicate made above, owned by nothing else.
        unsafe { libc::close(fd) };
        drop(rd);
        let e = r.add_fd(fd, reader()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        drop(wr);
    }

    fn registering_an_fd_twice_is_eexist(r: &Reactor) {
        let (rd, _wr) = pipe().unwrap();
        let id = r.add_fd(rd.as_raw_fd(), reader()).unwrap();
        let e = r.add_fd(rd.as_raw_fd(), reader()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
        assert_eq!(r.fd_count(), 1);
        r.remove_fd(id).unwrap();
        r.add_fd(rd.as_raw_fd(), reader()).unwrap();
    }

    fn regular_files_are_eperm(r: &Reactor) {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let e = r.add_fd(f.as_raw_fd(), reader()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    }

    fn removing_an_unknown_registration_is_not_found(r: &Reactor) {
        let (rd, _wr) = pipe().unwrap();
        let id = r.add_fd(rd.as_raw_fd(), reader()).unwrap();
        r.remove_fd(id).unwrap();
        assert_eq!(r.remove_fd(id).unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(r.set_fd_interest(id, Interest::READABLE).unwrap_err().kind(), ErrorKind::NotFound);
    }

    fn a_handler_needs_a_callback(r: &Reactor) {
        let (rd, _wr) = pipe().unwrap();
        let e = r.add_fd(rd.as_raw_fd(), FdHandler::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let id = r.add_fd(rd.as_raw_fd(), reader()).unwrap();
        let e = r.set_fd_interest(id, Interest::WRITABLE).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "no write callback: {e}");
    }

    fn removing_an_fd_closed_while_registered(r: &Reactor) {
        let (rd, wr) = pipe().unwrap();
        let fd = rd.as_raw_fd();
        let id = r.add_fd(fd, reader()).unwrap();
        r.poll(false);
        drop(rd);
        r.poll(false);
        r.remove_fd(id).unwrap();
        assert_eq!(r.fd_count(), 0);
        drop(wr);
    }
}
