//! A minimal seccomp filter for fault injection and for proving that a path makes no system
//! call: the listed system calls fail with an errno on the calling thread (and threads it
//! spawns later); everything else is allowed.

use std::io;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64

/// `BPF_LD | BPF_W | BPF_ABS` (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K` (0x05 | 0x10 | 0x00).
const BPF_JMP_JEQ_K: u16 = 0x15;
/// `BPF_RET | BPF_K` (0x06 | 0x00).
const BPF_RET_K: u16 = 0x06;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
#[cfg(target_endian = "little")]
const SECCOMP_DATA_ARG0: u32 = 16;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: BPF_JMP_JEQ_K,
        jt,
        jf,
        k,
    }
}

/// Makes each system call in `nrs` fail with `errno` on this thread from now on. Irreversible:
/// call it on a thread made for the purpose.
pub fn deny_on_this_thread(nrs: &[libc::c_long], errno: i32) -> io::Result<()> {
    assert!(
        nrs.len() < 200,
        "too many system calls for a short-jump filter"
    );
    let n = nrs.len() as u8;
    let mut prog = vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        // Another architecture's calling convention: allow (the test only concerns ours).
        jeq(AUDIT_ARCH, 0, n + 1),
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
    ];
    for (i, &nr) in nrs.iter().enumerate() {
        // Match: jump to the ERRNO return after the remaining checks and the ALLOW.
        prog.push(jeq(nr as u32, n - i as u8, 0));
    }
    prog.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW));
    prog.push(stmt(
        BPF_RET_K,
        libc::SECCOMP_RET_ERRNO | (errno as u32 & 0xffff),
    ));
    install(&mut prog)
}

/// Makes system call `nr` fail with `errno` (or, with `errno` 0, return 0 as if it had
/// succeeded, without being made) on this thread from now on when its first argument, as a 32-bit value, is `arg0`;
/// every other call is allowed. Irreversible, as [`deny_on_this_thread`].
pub fn answer_on_this_thread(nr: libc::c_long, arg0: u32, errno: i32) -> io::Result<()> {
    let mut prog = vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        jeq(AUDIT_ARCH, 0, 4),
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
        jeq(nr as u32, 0, 2),
        // The low 32 bits of args[0] (little-endian).
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARG0),
        jeq(arg0, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ERRNO | (errno as u32 & 0xffff)),
    ];
    install(&mut prog)
}

/// Installs `prog` as this thread's seccomp filter (after `PR_SET_NO_NEW_PRIVS`).
fn install(prog: &mut [libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fprog` points to a filter program that lives through the call; the kernel
    // copies it.
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const _,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
