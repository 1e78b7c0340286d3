//! The sandbox holder: the small single-threaded process that builds a sandbox and becomes its
//! PID 1.
//!
//! A worker starts it with [`crate::Sandbox::create`] (a fresh exec, so it has one thread and no
//! tokio), its control socket as stdin. The holder reads its config, unshares the namespaces,
//! then forks once: the child is PID 1 of the new pid namespace, builds the root and serves
//! the control socket ([`pid1`]); the parent only waits for it and exits with its status.
//!
//! The holder and PID 1 keep root (they build the root and serve the worker), but no process
//! PID 1 starts does: each one sets no_new_privs and, when the holder is real root, switches
//! to the sandbox's unprivileged [`crate::RunAs`] identity with every capability dropped,
//! before exec ([`privileges`]), and installs a seccomp filter that refuses new namespaces,
//! tracing and the kernel's other rarely needed surfaces ([`seccomp`]). In the user-namespace
//! fallback (a worker without root or without `CAP_SYS_ADMIN`), its processes stay uid 0 of the
//! namespace (the worker's own uid outside) but hold no capability in it, with no_new_privs,
//! locked securebits and the filter.
//!
//! Everything here runs before or without any other thread, which is what makes `unshare`,
//! `fork` and the descriptor juggling below sound. Nothing here may panic on what the worker
//! sends: a bad frame ends the sandbox with a message on stderr.

#![allow(unsafe_code)]

mod loopback;
mod pid1;
mod privileges;
mod rootfs;
mod seccomp;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::{fstat, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{dup2_stdin, fork, getegid, geteuid, ForkResult};

use crate::wire::{encode, Event, FrameBuffer, HolderConfig};
use privileges::Privileges;

/// The entry point of the holder program: call it first thing in `main` of the binary given as
/// [`crate::SandboxConfig::init_program`], before any thread, runtime or logger exists.
/// Never returns: the process exits when its sandbox ends.
pub fn init_main() -> ! {
    let code = match run() {
        Ok(code) => code,
        Err(reason) => {
            eprintln!("sand-sandbox-init: {reason}");
            1
        }
    };
    std::process::exit(code)
}

/// Runs the outer half of the holder; returns the exit code.
fn run() -> Result<i32, String> {
    ensure_single_threaded()?;
    close_inherited_descriptors();
    let fd3 = reserve_fd3()?;
    let control = take_control_socket()?;
    let mut frames = FrameBuffer::default();
    let config = read_config(&control, &mut frames)?;
    let prepared = enter_namespaces(&config).and_then(|user_namespace| {
        let privileges = Privileges::new(config.run_as, user_namespace)?;
        let sources = rootfs::Sources::open(&config, &privileges)?;
        Ok((privileges, sources))
    });
    let (privileges, sources) = match prepared {
        Ok(prepared) => prepared,
        Err(reason) => {
            report(&control, &Event::SetupFailed(reason.clone()));
            return Err(reason);
        }
    };
    // SAFETY: this process is single-threaded (checked above), so the child may run any code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => pid1::run(control, frames, config, sources, fd3, privileges),
        Ok(ForkResult::Parent { child }) => {
            // Only PID 1 holds the control socket now, so the worker closing its end reaches it.
            drop(control);
            drop(sources);
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                    Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i32),
                    Ok(_) | Err(Errno::EINTR) => continue,
                    Err(e) => return Err(format!("waiting for the sandbox's PID 1: {e}")),
                }
            }
        }
        Err(e) => {
            let reason = format!("fork of the sandbox's PID 1 failed: {e}");
            report(&control, &Event::SetupFailed(reason.clone()));
            Err(reason)
        }
    }
}

fn ensure_single_threaded() -> Result<(), String> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|e| format!("reading /proc/self/task: {e}"))?
        .count();
    if threads != 1 {
        return Err(format!(
            "the holder must be single-threaded but has {threads} threads"
        ));
    }
    Ok(())
}

/// Closes every descriptor above stderr: whatever the worker itself inherited without
/// close-on-exec must not reach the sandbox's processes. The control socket is stdin.
fn close_inherited_descriptors() {
    // SAFETY: no object in this freshly exec'd process owns a descriptor above 2 yet (the Rust
    // runtime opens none), so closing them cannot invalidate an owner.
    let closed = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if closed == 0 {
        return;
    }
    // Kernels before 5.9 lack close_range: close what /proc lists.
    let listed: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect(),
        Err(_) => return,
    };
    for fd in listed.into_iter().filter(|&fd| fd > 2) {
        // SAFETY: as above; the directory's own descriptor is already closed (EBADF, ignored).
        unsafe { libc::close(fd) };
    }
}

/// Takes descriptor 3 and points it at /dev/null, close-on-exec.
///
/// PID 1 later `dup2`s each spawned process's channel onto it just before the spawn, so no
/// other long-lived descriptor may sit there.
fn reserve_fd3() -> Result<OwnedFd, String> {
    let null = open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("opening /dev/null: {e}"))?;
    if null.as_raw_fd() == 3 {
        return Ok(null);
    }
    // SAFETY: dup3 only reads `null` (valid, owned) and replaces whatever was at 3.
    let raw = unsafe { libc::dup3(null.as_raw_fd(), 3, libc::O_CLOEXEC) };
    Errno::result(raw).map_err(|e| format!("reserving descriptor 3: {e}"))?;
    // SAFETY: descriptor 3 is owned by no object in this process: the Rust runtime opens none,
    // and one inherited there has no owner here. dup3 just made it ours.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The worker hands the control socket over as stdin; move it off stdin, leave /dev/null there.
fn take_control_socket() -> Result<UnixStream, String> {
    let stdin = std::io::stdin();
    let is_socket = fstat(stdin.as_fd())
        .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK)
        .unwrap_or(false);
    if !is_socket {
        return Err(
            "stdin is not a control socket: the holder is started by sand_sandbox::Sandbox::create"
                .into(),
        );
    }
    let control = stdin
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("duplicating stdin: {e}"))?;
    let null = open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening /dev/null: {e}"))?;
    dup2_stdin(&null).map_err(|e| format!("replacing stdin: {e}"))?;
    Ok(UnixStream::from(control))
}

fn read_config(mut control: &UnixStream, frames: &mut FrameBuffer) -> Result<HolderConfig, String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(config) = frames
            .next()
            .map_err(|e| format!("reading the config: {e}"))?
        {
            return Ok(config);
        }
        match control.read(&mut chunk) {
            Ok(0) => {
                return Err("the worker closed the control socket before sending the config".into())
            }
            Ok(n) => frames.push(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the config: {e}")),
        }
    }
}

/// Unshares mount, ipc, uts, pid (and net) namespaces, inside a new user namespace when this
/// process lacks the privilege to do it directly. Returns whether it entered a user namespace.
fn enter_namespaces(config: &HolderConfig) -> Result<bool, String> {
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWPID;
    if !config.network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    let mut user_namespace = !geteuid().is_root();
    if user_namespace {
        enter_user_namespace()?;
    }
    match unshare(flags) {
        Ok(()) => {}
        // Root without CAP_SYS_ADMIN (a container, say): a user namespace grants it.
        Err(Errno::EPERM) if !user_namespace => {
            enter_user_namespace()?;
            user_namespace = true;
            unshare(flags).map_err(|e| format!("unshare of the sandbox namespaces: {e}"))?;
        }
        Err(e) => return Err(format!("unshare of the sandbox namespaces: {e}")),
    }
    // Nothing mounted from here on may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {e}"))?;
    Ok(user_namespace)
}

/// Enters a new user namespace where this process's uid and gid are mapped to 0.
fn enter_user_namespace() -> Result<(), String> {
    let (uid, gid) = (geteuid(), getegid());
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| {
        format!("unshare of a user namespace failed ({e}); unprivileged user namespaces may be disabled on this host")
    })?;
    let write = |file: &str, content: String| {
        std::fs::write(file, &content).map_err(|e| format!("writing {content:?} to {file}: {e}"))
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1"))
}

/// Sends an event to the worker. A failure means the worker is gone; the caller finds out on
/// its next read, so the error is only logged.
fn report(mut control: &UnixStream, event: &Event) -> bool {
    let sent = encode(event)
        .map_err(|e| e.to_string())
        .and_then(|frame| control.write_all(&frame).map_err(|e| e.to_string()));
    match sent {
        Ok(()) => true,
        Err(e) => {
            eprintln!("sand-sandbox-init: sending {event:?} to the worker: {e}");
            false
        }
    }
}
