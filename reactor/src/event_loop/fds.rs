//! Registering fds with the reactor: [`Reactor::add_fd`], [`Reactor::set_fd_interest`],
//! [`Reactor::remove_fd`], and the checks they make before the backend sees the fd.

use std::io;

use super::*;

impl Reactor {
    /// Registers `fd` with `handler`'s callbacks, watching for what they handle (readable if
    /// there is a read callback, writable if there is a write callback).
    ///
    /// The reactor does not own `fd`: keep it open until [`remove_fd`](Self::remove_fd), and
    /// remove it before closing it (an io_uring poll would otherwise keep watching whatever
    /// file the number names by then). An fd can be registered once per reactor.
    ///
    /// # Errors
    /// `InvalidInput` if `handler` has neither a read nor a write callback; `EBADF` for an
    /// invalid fd; `EEXIST` if `fd` is already registered; `EPERM` for a regular file or
    /// directory, which are always ready and cannot be watched.
    pub fn add_fd(&self, fd: RawFd, handler: FdHandler) -> io::Result<FdId> {
        self.birth.check()?;
        let natural = handler.natural_interest();
        let interest = handler.initial_interest();
        if natural.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an FdHandler needs a read or a write callback",
            ));
        }
        if (interest.is_readable() && !natural.is_readable())
            || (interest.is_writable() && !natural.is_writable())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interest {interest:?} needs a callback the FdHandler was not given"),
            ));
        }
        // Checks the fd now (EBADF, EPERM), also when it is not watched yet, and identifies its
        // file, to tell a second registration of an open fd (EEXIST) from a new file behind a
        // number whose registered fd was closed without `remove_fd`.
        let file = file_identity(fd)?;
        if let Some((old, old_file, old_interest)) = self.handlers.live_for_fd(fd) {
            if old_file == file {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            tracing::debug!(
                fd,
                ?old,
                "reactor: fd closed while registered and reused; retiring the old registration"
            );
            self.monitor
                .borrow_mut()
                .retire(fd, old.token(), old_interest.poll_bits());
            self.handlers.mark_stale(old);
        }
        let id = self.handlers.insert(fd, file, handler, interest);
        let res = self
            .monitor
            .borrow_mut()
            .update(fd, id.token(), 0, interest.poll_bits());
        if let Err(e) = res {
            self.handlers.forget(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Changes what the registration `id` waits for. [`Interest::NONE`] pauses it (it stays
    /// registered). Allowed from inside any callback.
    ///
    /// # Errors
    /// `NotFound` for an unknown or removed `id`; `InvalidInput` for an interest without a
    /// matching callback; the fd monitor's error otherwise.
    pub fn set_fd_interest(&self, id: FdId, interest: Interest) -> io::Result<()> {
        self.birth.check()?;
        let (fd, old) = self.handlers.lookup(id, Some(interest))?;
        if old != interest {
            self.monitor.borrow_mut().update(
                fd,
                id.token(),
                old.poll_bits(),
                interest.poll_bits(),
            )?;
            self.handlers.set_interest(id, interest);
        }
        Ok(())
    }

    /// Removes the registration `id`. Allowed from inside any callback, its own included; no
    /// callback of `id` runs after this returns, and its callbacks are dropped once the
    /// outermost `poll` on the stack has finished dispatching.
    ///
    /// If the fd was closed before this call, the kernel has already forgotten it; the
    /// registration is removed all the same.
    ///
    /// # Errors
    /// `NotFound` for an unknown or removed `id`; the fd monitor's error otherwise.
    pub fn remove_fd(&self, id: FdId) -> io::Result<()> {
        self.birth.check()?;
        let (fd, old) = self.handlers.lookup(id, None)?;
        if !old.is_empty() {
            let res = self
                .monitor
                .borrow_mut()
                .update(fd, id.token(), old.poll_bits(), 0);
            match res {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBADF) | Some(libc::ENOENT)) => {}
                Err(e) => return Err(e),
            }
        }
        self.handlers.remove(id, self.depth.get() > 0);
        Ok(())
    }
}

/// `(st_dev, st_ino)` of `fd`'s file, failing like registering it with epoll would: `EBADF`
/// for a closed fd, `EPERM` for a regular file or directory.
fn file_identity(fd: RawFd) -> io::Result<(u64, u64)> {
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer for the duration of the call.
    crate::sys::cvt(unsafe { libc::fstat(fd, &mut st) })?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG | libc::S_IFDIR => Err(io::Error::from_raw_os_error(libc::EPERM)),
        _ => Ok((st.st_dev, st.st_ino)),
    }
}
