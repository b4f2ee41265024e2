//! The `nbd-server` binary as a service, on both backends: listening sockets passed the way
//! systemd passes them (`LISTEN_PID`, `LISTEN_FDS`, fds from 3), the readiness message to
//! `NOTIFY_SOCKET`, `--pid-file`, and `--fork`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Client;
use common::served::{pass_fds, scratch};
use tests::backend_tests;

backend_tests! {
    fn socket_activation_serves_the_passed_sockets_and_tells_systemd(r: &Reactor) {
        let backend = r.backend().to_string();
        let file = scratch("activation", &backend);
        std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
        let sock = scratch("activation-sock", &backend);
        let notify = scratch("activation-notify", &backend);
        let pid_file = scratch("activation-pid", &backend);
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let ready = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
        ready.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let (t, u) = (tcp.as_raw_fd(), unix.as_raw_fd());
        // What systemd does: the sockets at fds 3 and 4, LISTEN_PID naming the server's own
        // pid (the shell's, which exec keeps), LISTEN_FDS counting them.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=2 exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_nbd-server"))
            .args(["--backend", &backend, "-x", "disk", "--pid-file", pid_file.to_str().unwrap()])
            .arg(&file)
            .env("NOTIFY_SOCKET", &notify)
            .stdout(Stdio::piped());
        pass_fds(&mut cmd, &[t, u]);
        let mut child = cmd.spawn().expect("start nbd-server");
        drop((tcp, unix));
        let mut buf = [0u8; 64];
        let n = ready.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
        assert_eq!(&buf[..n], b"READY=1");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        for _ in 0..2 {
            let mut l = String::new();
            out.read_line(&mut l).unwrap();
            lines.push(l.trim().to_string());
        }
        assert_eq!(lines, [format!("nbd-server: listening on tcp {addr}"), format!("nbd-server: listening on unix {}", sock.display())]);
        assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), format!("{}\n", child.id()));
        // Both passed sockets serve, and nothing listens on the default port for it.
        let mut c = Client::connect(addr);
        let (size, _) = c.go("disk");
        assert_eq!(size, 1 << 20);
        assert_eq!(c.read(1, 0, 4096), (0, vec![7u8; 4096]));
        let mut u = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut greeting = [0u8; 18];
        std::io::Read::read_exact(&mut u, &mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        // SIGTERM: a clean exit that removes the pid file but not systemd's socket file.
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        drop((c, u));
        assert!(child.wait().unwrap().success());
        assert!(!pid_file.exists(), "the pid file is removed at exit");
        assert!(sock.exists(), "a passed socket's file is its maker's");
        for p in [file, sock, notify] {
            std::fs::remove_file(p).unwrap();
        }
    }

    fn fork_returns_once_serving_and_the_server_runs_on_detached(r: &Reactor) {
        let backend = r.backend().to_string();
        let file = scratch("fork", &backend);
        std::fs::write(&file, vec![9u8; 1 << 20]).unwrap();
        let pid_file = scratch("fork-pid", &backend);
        let child = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
            .args(["--fork", "--backend", &backend, "--bind", "127.0.0.1:0", "-x", "disk"])
            .args(["--pid-file", pid_file.to_str().unwrap()])
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nbd-server");
        let parent = child.id();
        // The output ends (both streams) only once the parent has exited and the server has
        // let go of them: waited for on a thread, so a server that keeps them fails the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()).unwrap());
        let out = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the parent returns and the server lets go of its output")
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let addr = common::served::tcp_address(&stdout);
        // The pid file, written before the parent returned, names the server: another
        // process, leading a session of its own.
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        assert_ne!(pid as u32, parent);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        assert_eq!(fields[3], pid.to_string(), "session id is the server's pid: {stat}");
        let mut c = Client::connect(addr);
        let (size, _) = c.go("disk");
        assert_eq!(size, 1 << 20);
        assert_eq!(c.read(1, 4096, 4096), (0, vec![9u8; 4096]));
        drop(c);
        // SIGTERM: a clean exit, which removes the pid file.
        // SAFETY: kill on the server's pid, read from its pid file just now.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while pid_file.exists() {
            assert!(std::time::Instant::now() < deadline, "the server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::remove_file(file).unwrap();
    }

    fn fork_reports_a_server_that_cannot_start(r: &Reactor) {
        let backend = r.backend().to_string();
        let missing = scratch("fork-missing", &backend);
        let out = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
            .args(["--fork", "--backend", &backend, "--bind", "127.0.0.1:0"])
            .arg(&missing)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(missing.to_str().unwrap()), "the child's error: {err}");
    }

    fn passed_sockets_and_explicit_listeners_do_not_mix(r: &Reactor) {
        let backend = r.backend().to_string();
        let file = scratch("activation-mix", &backend);
        std::fs::write(&file, [0u8; 4096]).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let t = tcp.as_raw_fd();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_nbd-server"))
            .args(["--backend", &backend, "--bind", "127.0.0.1:0"])
            .arg(&file);
        pass_fds(&mut cmd, &[t]);
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("socket activation"), "{err}");
        std::fs::remove_file(file).unwrap();
    }
}
