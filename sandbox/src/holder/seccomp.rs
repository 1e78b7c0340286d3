//! The system calls a sandboxed process may not make: a seccomp filter each process PID 1
//! starts installs just before exec, after dropping its privileges.
//!
//! Dropping root and every capability already makes most dangerous calls fail. What it leaves
//! open is the kernel surface an unprivileged process still reaches, which sandboxes close as
//! Docker's default profile and Firecracker's jailer do:
//!
//! - new namespaces (`unshare`, `setns`, `clone` with a `CLONE_NEW*` flag): a user namespace
//!   would give the grain every capability inside it, and with them mounts and much of the
//!   kernel's rarely exercised code;
//! - `clone3`, whose flags sit in memory a filter cannot read: it fails with `ENOSYS`, so the C
//!   library falls back to `clone` (threads and `fork` go on working);
//! - on x86_64, every x32 call (the same kernel functions under numbers with bit 30 set, which
//!   no list of x86_64 numbers covers); calls of any other ABI kill the process, as the
//!   compiled filter checks the architecture first;
//! - tracing and reaching into other processes (`ptrace`, `process_vm_readv`/`writev`,
//!   `pidfd_getfd`, which copies another process's descriptor, `process_madvise`, `kcmp`, which
//!   compares kernel objects of two processes), performance counters, eBPF, `userfaultfd`, the
//!   kernel keyring, file handles that bypass path checks, `fanotify_init`;
//! - io_uring (`io_uring_setup`, `_enter`, `_register`), as Docker refuses it: a large, often
//!   patched kernel surface whose operations no system-call filter can see;
//! - `modify_ldt` (x86: custom segments, a long history of kernel bugs) and `personality` with
//!   anything but the personas Docker allows (`PER_LINUX`, `PER_LINUX32`, `UNAME26` and the
//!   query `0xffffffff`): another persona can re-enable a readable-implies-exec mapping;
//! - NUMA placement (`mbind`, `set_mempolicy`, `set_mempolicy_home_node`, `move_pages`,
//!   `migrate_pages`), which Docker allows only with `CAP_SYS_NICE`: where memory lives is the
//!   operator's decision on a shared host; a library that tries it gets `EPERM` and runs with
//!   the default policy (`get_mempolicy`, which only reads, stays allowed);
//! - obsolete calls no program needs (`uselib`, `lookup_dcookie`, `nfsservctl`, `ustat`,
//!   `sysfs`, `_sysctl`);
//! - mounts, module loading, kexec, reboot, swap, clocks, accounting and quotas (refused for
//!   lack of capabilities anyway; refused here too, whatever the identity).
//!
//! Every other call is allowed. This stays a deny-list on purpose: an allow-list is only as
//! good as the programs it was checked against, and grains are arbitrary programs (Python with
//! numpy and its BLAS threads, subprocesses, Rust binaries). Checking one here would need
//! numpy, which this project's test hosts lack, so a complete allow-list could not be kept
//! honest by a test; a missing entry would fail grains in ways nobody could predict. A refused
//! call returns `EPERM`, as it would for an unprivileged process, so programs see an ordinary
//! error.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// The flags of `clone` that make a new namespace (`CLONE_NEWTIME` only `unshare` and `clone3`
/// take, both refused).
const CLONE_NEW_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// The calls refused outright with `EPERM`.
const REFUSED: &[libc::c_long] = &[
    // Namespaces and mounts.
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    // Other processes and the kernel's instruments.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_perf_event_open,
    libc::SYS_bpf,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_pidfd_getfd,
    libc::SYS_process_madvise,
    libc::SYS_kcmp,
    libc::SYS_fanotify_init,
    libc::SYS_lookup_dcookie,
    // io_uring: a second system-call interface no filter sees into.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // NUMA placement (Docker: CAP_SYS_NICE only).
    libc::SYS_mbind,
    libc::SYS_set_mempolicy,
    libc::SYS_set_mempolicy_home_node,
    libc::SYS_move_pages,
    libc::SYS_migrate_pages,
    // The machine itself.
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_modify_ldt,
    // Obsolete.
    libc::SYS_nfsservctl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ustat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_sysfs,
    #[cfg(target_arch = "x86_64")]
    libc::SYS__sysctl,
];

/// The personas `personality` may set (Docker's list): `PER_LINUX`, `PER_LINUX32`, `UNAME26`,
/// `PER_LINUX32 | UNAME26`, and `0xffffffff`, which only reads the current one.
const PERSONAS_ALLOWED: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The compiled filters, shared by every spawn (the child only reads them).
#[derive(Debug, Clone)]
pub(super) struct SyscallFilter(Arc<Vec<BpfProgram>>);

impl SyscallFilter {
    /// Compiles the filters for the machine's architecture.
    pub(super) fn new() -> Result<SyscallFilter, String> {
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|e| format!("seccomp filter: {e}"))?;
        let mut refused: BTreeMap<i64, Vec<SeccompRule>> =
            REFUSED.iter().map(|&call| (call, Vec::new())).collect();
        let new_namespace = CLONE_NEW_FLAGS
            .iter()
            .map(|&flag| {
                let cond = SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )?;
                SeccompRule::new(vec![cond])
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("seccomp filter: {e}"))?;
        refused.insert(libc::SYS_clone, new_namespace);
        // One rule, its conditions and-ed: refused when the persona is none of the allowed.
        let other_persona = PERSONAS_ALLOWED
            .iter()
            .map(|&persona| {
                SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, persona)
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(SeccompRule::new)
            .map_err(|e| format!("seccomp filter: {e}"))?;
        refused.insert(libc::SYS_personality, vec![other_persona]);
        let refused = compile(refused, libc::EPERM, arch)?;
        let clone3 = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
        let clone3 = compile(clone3, libc::ENOSYS, arch)?;
        let mut filters = vec![refused, clone3];
        if cfg!(target_arch = "x86_64") {
            filters.push(refuse_x32());
        }
        Ok(SyscallFilter(Arc::new(filters)))
    }

    /// Installs the filters in this process (and so in everything it will exec and fork).
    /// no_new_privs must be set already (it is, first thing, by `Privileges::apply`).
    ///
    /// Runs in the child between fork and exec: it only makes the `prctl` and `seccomp`
    /// system calls, and never allocates.
    pub(super) fn apply(&self) -> io::Result<()> {
        for program in self.0.iter() {
            seccompiler::apply_filter(program).map_err(|e| match e {
                seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
                _ => io::Error::from_raw_os_error(libc::EINVAL),
            })?;
        }
        Ok(())
    }
}

/// A filter that refuses every x32 call: four instructions, which seccompiler's rules (one
/// number each) cannot express.
fn refuse_x32() -> BpfProgram {
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let op = |code: u32, jt: u8, jf: u8, k: u32| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    vec![
        // Load the call's number (offset 0 of `struct seccomp_data`).
        op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        // At or past the x32 bit: the next instruction; below it: skip one.
        op(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            0,
            1,
            X32_SYSCALL_BIT,
        ),
        op(
            libc::BPF_RET | libc::BPF_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// A filter that answers the calls in `rules` with `errno` and allows every other one.
fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    errno: i32,
    arch: TargetArch,
) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    filter
        .try_into()
        .map_err(|e| format!("seccomp filter: {e}"))
}
