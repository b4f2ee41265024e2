//! `--fork`: the server detaches from the process that started it, and that process exits
//! once the server serves, as `qemu-nbd --fork` and nbdkit do. A script can then start the
//! server and use it on the next line:
//!
//! ```sh
//! nbd-server --fork --pid-file /run/disk.pid --socket /run/disk.sock disk.raw
//! qemu-img info 'nbd+unix:///?socket=/run/disk.sock'
//! kill "$(cat /run/disk.pid)"
//! ```
//!
//! The parent forks before any thread starts and waits on a pipe. The child starts a new
//! session (no controlling terminal, so closing the terminal sends it nothing), starts the
//! server, writes its pid file and its listening lines, and then writes one byte to the pipe
//! and points its standard streams at `/dev/null`, so that a caller reading the output sees
//! its end. The parent exits 0 on that byte. If the child fails first, the pipe closes without
//! it, and the parent exits with the child's status (its error went to the shared stderr).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;

/// The side of the fork this process is on.
pub enum Forked {
    /// The process that was started: exit with this status.
    Parent(ExitCode),
    /// The server: call [`Detached::ready`] once it serves.
    Child(Detached),
}

/// The server's end of the pipe to the process that started it.
pub struct Detached {
    ready: std::fs::File,
}

/// Forks the process (see the module doc). Must be called before any thread starts:
/// a process with more than one thread gets `InvalidInput`, as only the forking thread would
/// exist in the child.
///
/// # Errors
/// More than one thread, or the `pipe2`, `fork` or `setsid` call failing.
pub fn fork() -> io::Result<Forked> {
    if threads()? != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--fork needs a process that has started no thread yet",
        ));
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just made by pipe2 and are owned by nobody else.
    let (rd, wr) = unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    // SAFETY: the process has one thread (checked above), so the child is a whole copy of
    // it; both sides only continue with ordinary code.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(rd);
            // SAFETY: setsid has no memory effects; the child of a fork is never a process
            // group leader, so it cannot fail with EPERM.
            if unsafe { libc::setsid() } == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(Forked::Child(Detached {
                ready: std::fs::File::from(wr),
            }))
        }
        child => {
            drop(wr);
            Ok(Forked::Parent(wait_for(child, std::fs::File::from(rd))))
        }
    }
}

/// The parent's side: 0 once the child says it serves, else the child's own status.
fn wait_for(child: libc::pid_t, mut ready: std::fs::File) -> ExitCode {
    let mut byte = [0u8; 1];
    loop {
        match ready.read(&mut byte) {
            Ok(1) => return ExitCode::SUCCESS,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // End of file (or an error): the child exited before it served.
            _ => break,
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid out-pointer.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc == child {
            break;
        }
        if rc == -1 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return ExitCode::FAILURE;
        }
    }
    if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => ExitCode::FAILURE,
            code => ExitCode::from(code as u8),
        }
    } else {
        ExitCode::FAILURE
    }
}

impl Detached {
    /// Tells the process that started the server that it serves, then points standard
    /// input, output and error at `/dev/null` (the log goes with them: run the server
    /// without `--fork` under a service manager to keep it).
    ///
    /// # Errors
    /// Opening `/dev/null` or `dup2` failing; the parent has been told either way.
    pub fn ready(mut self) -> io::Result<()> {
        let _ = std::io::stdout().flush();
        let _ = self.ready.write_all(b"R");
        drop(self.ready);
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        for fd in 0..3 {
            // SAFETY: dup2 of an fd we own onto a standard stream's number.
            if unsafe { libc::dup2(null.as_raw_fd(), fd) } == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The number of threads of this process (`Threads:` in `/proc/self/status`).
fn threads() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no thread count in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_with_threads_is_not_forked() {
        // The test harness runs this test on a thread of its own.
        let held = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(1)));
        let err = fork().err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        held.join().unwrap();
    }
}
