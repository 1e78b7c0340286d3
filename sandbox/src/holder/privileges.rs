//! Dropping the privileges of a sandboxed process, in its forked child just before exec.
//!
//! Namespaces alone do not make a sandbox: a process that is still root, with every
//! capability, can remount its read-only root, mount the host's disks or load modules. So
//! every process PID 1 starts first sets no_new_privs (set-user-ID bits and file capabilities
//! stop working), and, when the sandbox was built by real root, also leaves root for
//! [`RunAs`], as Firecracker's jailer does. The order follows capabilities(7) and prctl(2):
//!
//! 1. `PR_SET_NO_NEW_PRIVS`;
//! 2. clear the ambient set;
//! 3. drop every capability from the bounding set (this needs `CAP_SETPCAP`, so still as root);
//! 4. `setgroups([])` and `setresgid(g, g, g)` (they need `CAP_SETGID`, so before the uid);
//! 5. `setresuid(u, u, u)`: with no uid left 0, the kernel clears the permitted, effective and
//!    ambient sets;
//! 6. `capset` to all zero, which also empties the inheritable set the uid change keeps;
//! 7. install the seccomp filter of [`super::seccomp`].
//!
//! With an empty bounding set, no exec can grant a capability back. The first failing step
//! fails the spawn: exec never happens, so no process is left running as root.
//!
//! In the user-namespace fallback (a worker without root, or without `CAP_SYS_ADMIN`), only
//! the worker's uid is mapped (to 0), so there is no other identity to switch to: those
//! processes stay uid 0 of their namespace but lose every capability in it (which would
//! otherwise include `CAP_NET_ADMIN` and `CAP_SYS_ADMIN` over the sandbox's own namespaces):
//!
//! 1. `PR_SET_NO_NEW_PRIVS`;
//! 2. lock the securebits `NOROOT` (exec as uid 0 grants no capability), `NO_SETUID_FIXUP`,
//!    `KEEP_CAPS` off and `NO_CAP_AMBIENT_RAISE`, each with its `_LOCKED` bit, so that no
//!    process of the sandbox can turn them back (this needs `CAP_SETPCAP`, so first);
//! 3. and 4. clear the ambient set and drop every capability from the bounding set;
//! 5. `capset` to all zero;
//! 6. install the seccomp filter.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::seccomp::SyscallFilter;
use crate::config::RunAs;

/// Where the kernel says how many capabilities it knows.
const CAP_LAST_CAP: &str = "/proc/sys/kernel/cap_last_cap";
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets, in two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// The securebits a user-namespace sandbox's processes run with (linux/securebits.h):
/// `NOROOT`, `NO_SETUID_FIXUP` and `NO_CAP_AMBIENT_RAISE` set, `KEEP_CAPS` clear, all locked.
const SECUREBITS_LOCKED_DOWN: libc::c_ulong = {
    const NOROOT: libc::c_ulong = 1 << 0;
    const NOROOT_LOCKED: libc::c_ulong = 1 << 1;
    const NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
    const NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
    const KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
    const NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
    const NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;
    NOROOT
        | NOROOT_LOCKED
        | NO_SETUID_FIXUP
        | NO_SETUID_FIXUP_LOCKED
        | KEEP_CAPS_LOCKED
        | NO_CAP_AMBIENT_RAISE
        | NO_CAP_AMBIENT_RAISE_LOCKED
};

/// What a spawned process gives up before exec: its identity, and the system calls of
/// [`SyscallFilter`].
#[derive(Debug, Clone)]
pub(super) struct Privileges {
    identity: Identity,
    syscalls: SyscallFilter,
}

/// Whether a spawned process leaves root.
#[derive(Debug, Clone, Copy)]
enum Identity {
    /// The sandbox was built by real root: leave root for this identity, drop every
    /// capability up to and including `last_cap`.
    Drop {
        /// The identity to become.
        run_as: RunAs,
        /// The highest capability number this kernel knows.
        last_cap: u32,
    },
    /// The sandbox lives in a user namespace (a worker without root, or root without
    /// `CAP_SYS_ADMIN`) where only the worker's uid is mapped: stay uid 0 of the namespace,
    /// but drop every capability up to and including `last_cap` and lock the securebits.
    Namespace {
        /// The highest capability number this kernel knows.
        last_cap: u32,
    },
}

impl Privileges {
    /// Decides what to drop. `user_namespace` is true when the holder had to enter a user
    /// namespace to build the sandbox. Reads the kernel's last capability, so call it while
    /// the host's /proc is still mounted.
    pub(super) fn new(run_as: RunAs, user_namespace: bool) -> Result<Privileges, String> {
        let syscalls = SyscallFilter::new()?;
        let text = std::fs::read_to_string(CAP_LAST_CAP)
            .map_err(|e| format!("reading {CAP_LAST_CAP}: {e}"))?;
        let last_cap = text
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|&cap| cap < 64)
            .ok_or_else(|| format!("{CAP_LAST_CAP} holds {text:?}, not a capability number"))?;
        let identity = if user_namespace {
            Identity::Namespace { last_cap }
        } else {
            Identity::Drop { run_as, last_cap }
        };
        Ok(Privileges { identity, syscalls })
    }

    /// The identity processes run as, for messages; `None` when they keep the namespace's.
    pub(super) fn run_as(&self) -> Option<RunAs> {
        match self.identity {
            Identity::Drop { run_as, .. } => Some(run_as),
            Identity::Namespace { .. } => None,
        }
    }

    /// Checks, by its mode bits, that the processes can use a host path the sandbox mounts
    /// (list and enter a directory, read a file), so an unreadable bundle is a clear setup
    /// error rather than a grain failing later. Only the path itself is checked: inside the
    /// sandbox it is a mount point, its host parents are out of the way.
    pub(super) fn check_reachable(&self, path: &Path) -> Result<(), String> {
        let Identity::Drop { run_as, .. } = self.identity else {
            return Ok(());
        };
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let needed = if meta.is_dir() { 0o5 } else { 0o4 };
        let mode = meta.mode();
        let granted = if meta.uid() == run_as.uid {
            mode >> 6
        } else if meta.gid() == run_as.gid {
            mode >> 3
        } else {
            mode
        } & 0o7;
        if granted & needed != needed {
            return Err(format!(
                "{} (mode {:o}, owner {}:{}) is not {} by the sandbox's processes, which run as uid {} gid {}",
                path.display(),
                mode & 0o7777,
                meta.uid(),
                meta.gid(),
                if meta.is_dir() { "listable and enterable" } else { "readable" },
                run_as.uid,
                run_as.gid
            ));
        }
        Ok(())
    }

    /// Drops the privileges, installs the seccomp filter, then changes to `cwd` (as the new
    /// identity, so a directory it may not enter is refused).
    ///
    /// Runs in the child between fork and exec: it only makes async-signal-safe system calls
    /// and never allocates.
    pub(super) fn apply(&self, cwd: &CString) -> io::Result<()> {
        check(prctl(libc::PR_SET_NO_NEW_PRIVS, 1))?;
        match self.identity {
            Identity::Drop { run_as, last_cap } => drop_root(run_as, last_cap)?,
            Identity::Namespace { last_cap } => drop_namespace_capabilities(last_cap)?,
        }
        self.syscalls.apply()?;
        // SAFETY: `cwd` is a valid NUL-terminated string that outlives the call.
        check(unsafe { libc::chdir(cwd.as_ptr()) })
    }
}

/// Steps 2 to 6 of the module documentation, for a sandbox built by real root.
fn drop_root(run_as: RunAs, last_cap: u32) -> io::Result<()> {
    drop_ambient_and_bounding(last_cap)?;
    // SAFETY: a zero-length list; the pointer is never read.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresgid(run_as.gid, run_as.gid, run_as.gid) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresuid(run_as.uid, run_as.uid, run_as.uid) })?;
    clear_capability_sets()
}

/// Steps 2 to 5 of the user-namespace list in the module documentation.
fn drop_namespace_capabilities(last_cap: u32) -> io::Result<()> {
    check(prctl(libc::PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN))?;
    drop_ambient_and_bounding(last_cap)?;
    clear_capability_sets()
}

/// Clears the ambient set and drops capabilities 0 to `last_cap` from the bounding set.
fn drop_ambient_and_bounding(last_cap: u32) -> io::Result<()> {
    match check(prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )) {
        // EINVAL: a kernel before 4.3, which has no ambient set to clear.
        Err(e) if e.raw_os_error() != Some(libc::EINVAL) => return Err(e),
        Ok(()) | Err(_) => {}
    }
    for cap in 0..=last_cap {
        check(prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)))?;
    }
    Ok(())
}

/// Empties the effective, permitted and inheritable sets of this process.
fn clear_capability_sets() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let empty = Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    };
    let data = [empty; 2];
    // SAFETY: capset reads one version-3 header and two data structs, laid out as the kernel
    // defines them (linux/capability.h), all alive for the call.
    check(unsafe {
        libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) as libc::c_int
    })
}

/// `prctl(option, arg, 0, 0, 0)`, every argument a full `unsigned long` as the kernel reads it.
fn prctl(option: libc::c_int, arg: libc::c_ulong) -> libc::c_int {
    // SAFETY: integer arguments only; none of the options used here reads our memory.
    unsafe {
        libc::prctl(
            option,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    }
}

/// Turns a C-style return value into a result carrying errno.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
