//! PID 1 of a sandbox: builds the root, then serves the control socket until it closes.
//!
//! It starts the processes the worker asks for, each with its privileges dropped
//! ([`super::privileges`]), kills them on request, reports each one's
//! exit, and reaps every zombie of the namespace (orphans are reparented to it). When the
//! control socket closes it exits, and the kernel kills everything left in the pid namespace:
//! no sandbox outlives its worker.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CString, OsStr};
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{killpg, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{dup2, dup3, sethostname, Pid};

use super::privileges::Privileges;
use super::{loopback, report, rootfs};
use crate::wire::{Event, FrameBuffer, HolderConfig, Request, SpawnRequest, WireExit};

/// Bytes read from the control socket per `recvmsg`.
const RECEIVE_BYTES: usize = 64 * 1024;
/// Descriptors accepted per `recvmsg`. The kernel hands over one SCM_RIGHTS message per call,
/// and a spawn request carries at most four.
const RECEIVE_FDS_MAX: usize = 16;

/// Runs PID 1 and exits the process with its outcome.
pub(super) fn run(
    control: UnixStream,
    frames: FrameBuffer,
    config: HolderConfig,
    sources: rootfs::Sources,
    fd3: OwnedFd,
    privileges: Privileges,
) -> ! {
    let code = match serve(control, frames, &config, sources, fd3, privileges) {
        Ok(()) => 0,
        Err(reason) => {
            eprintln!("sand-sandbox-init: sandbox {:?}: {reason}", config.name);
            1
        }
    };
    std::process::exit(code)
}

fn serve(
    control: UnixStream,
    frames: FrameBuffer,
    config: &HolderConfig,
    sources: rootfs::Sources,
    fd3: OwnedFd,
    privileges: Privileges,
) -> Result<(), String> {
    // The outer holder only waits for us; if it is killed, so are we (and the namespace).
    set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("prctl(PR_SET_PDEATHSIG): {e}"))?;
    let mut sigchld = SigSet::empty();
    sigchld.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&sigchld), None)
        .map_err(|e| format!("blocking SIGCHLD: {e}"))?;
    let children = SignalFd::with_flags(&sigchld, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| format!("signalfd: {e}"))?;
    // Opened before the root changes: the new /dev could be unusable (a nodev mount).
    let null = open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("opening /dev/null: {e}"))?;

    if let Err(reason) = build(config, sources) {
        report(&control, &Event::SetupFailed(reason.clone()));
        return Err(reason);
    }
    if !report(&control, &Event::Ready) {
        return Err("the worker went away during setup".into());
    }
    let mut init = Init {
        control,
        frames,
        fds: VecDeque::new(),
        running: HashMap::new(),
        fd3,
        null,
        privileges,
    };
    init.serve(&children)
}

/// Everything between unshare and serving: the root, the hostname, the loopback device.
fn build(config: &HolderConfig, sources: rootfs::Sources) -> Result<(), String> {
    rootfs::build(config, sources)?;
    sethostname(&config.name).map_err(|e| format!("sethostname: {e}"))?;
    if !config.network {
        loopback::bring_up().map_err(|e| format!("bringing up lo: {e}"))?;
    }
    Ok(())
}

/// The state PID 1 serves from.
struct Init {
    control: UnixStream,
    frames: FrameBuffer,
    /// Descriptors received, in arrival order, not yet claimed by a spawn request.
    fds: VecDeque<OwnedFd>,
    /// Processes started and not yet reaped: pid to the spawn request that started it.
    running: HashMap<u32, u64>,
    /// Descriptor 3, /dev/null between spawns.
    fd3: OwnedFd,
    null: OwnedFd,
    /// What every spawned process gives up before exec.
    privileges: Privileges,
}

impl Init {
    fn serve(&mut self, children: &SignalFd) -> Result<(), String> {
        loop {
            let (control_ready, child_ready) = {
                let mut fds = [
                    PollFd::new(self.control.as_fd(), PollFlags::POLLIN),
                    PollFd::new(children.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(format!("poll: {e}")),
                }
                (fds[0].any().unwrap_or(true), fds[1].any().unwrap_or(true))
            };
            if child_ready {
                while let Ok(Some(_)) = children.read_signal() {}
                self.reap()?;
            }
            if control_ready {
                if !self.receive()? {
                    // The worker closed the sandbox or died. Exiting kills the namespace.
                    return Ok(());
                }
                while let Some(request) =
                    self.frames.next::<Request>().map_err(|e| e.to_string())?
                {
                    let event = self.handle(request)?;
                    if !report(&self.control, &event) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Reads what the worker sent; false when the socket is closed.
    fn receive(&mut self) -> Result<bool, String> {
        let mut bytes = vec![0u8; RECEIVE_BYTES];
        let mut received_fds: Vec<RawFd> = Vec::new();
        let received = loop {
            let mut iov = [IoSliceMut::new(&mut bytes)];
            let mut space = nix::cmsg_space!([RawFd; RECEIVE_FDS_MAX]);
            let message = match recvmsg::<()>(
                self.control.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(message) => message,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(format!("reading the control socket: {e}")),
            };
            let cmsgs = message
                .cmsgs()
                .map_err(|e| format!("descriptors lost on the control socket: {e}"))?;
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    received_fds.extend(fds);
                }
            }
            break message.bytes;
        };
        for fd in received_fds {
            // SAFETY: the kernel just installed this descriptor for us in recvmsg; nothing else
            // in the process knows it, so this is its only owner.
            self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if received == 0 {
            return Ok(false);
        }
        self.frames.push(&bytes[..received]);
        Ok(true)
    }

    fn handle(&mut self, request: Request) -> Result<Event, String> {
        match request {
            Request::Spawn(spawn) => {
                let wanted = spawn.descriptors();
                if self.fds.len() < wanted {
                    return Err(format!(
                        "a spawn request arrived with {} of its {wanted} descriptors",
                        self.fds.len()
                    ));
                }
                let (channel, stdio) = {
                    // In the order the worker sends them: see `SpawnRequest`.
                    let mut fds = self.fds.drain(..wanted);
                    let channel = if spawn.channel { fds.next() } else { None };
                    let mut stream = || fds.next().map_or_else(Stdio::null, Stdio::from);
                    (channel, [stream(), stream(), stream()])
                };
                self.spawn(spawn, channel, stdio)
            }
            Request::Kill { id, spawn_id } => {
                let target = self
                    .running
                    .iter()
                    .find(|(_, &started_by)| started_by == spawn_id);
                if let Some((&pid, _)) = target {
                    // The process leads its own group: take its children along.
                    match killpg(Pid::from_raw(pid as i32), Signal::SIGKILL) {
                        Ok(()) | Err(Errno::ESRCH) => {}
                        Err(e) => {
                            return Ok(Event::Failed {
                                id,
                                error: format!("kill: {e}"),
                            })
                        }
                    }
                }
                // Not running means it already exited: its exit event is on the way.
                Ok(Event::Killed { id })
            }
        }
    }

    /// Starts a process with `channel` as its descriptor 3 (none without it) and `stdio` as
    /// its standard streams, its privileges dropped.
    fn spawn(
        &mut self,
        request: SpawnRequest,
        channel: Option<OwnedFd>,
        stdio: [Stdio; 3],
    ) -> Result<Event, String> {
        let id = request.id;
        // The child changes directory itself, after dropping privileges: see `Privileges`.
        let Ok(cwd) = CString::new(request.cwd.clone()) else {
            return Ok(Event::Failed {
                id,
                error: "the working directory contains a NUL byte".into(),
            });
        };
        let privileges = self.privileges.clone();
        let has_channel = channel.is_some();
        // dup2 clears close-on-exec on descriptor 3 only, so the child inherits just the channel.
        // Without one, 3 stays /dev/null with close-on-exec: the child has no descriptor 3.
        if let Some(channel) = channel {
            if let Err(e) = dup2(&channel, &mut self.fd3) {
                return Ok(Event::Failed {
                    id,
                    error: format!("dup2 of the channel: {e}"),
                });
            }
        }
        // Every received descriptor is close-on-exec: Command places these three at 0, 1 and
        // 2 in the child, and our copies close when it returns, so no other process holds them.
        let [stdin, stdout, stderr] = stdio;
        let mut command = Command::new(OsStr::from_bytes(&request.program));
        command
            .args(request.args.iter().map(|arg| OsStr::from_bytes(arg)))
            .env_clear()
            .envs(
                request
                    .env
                    .iter()
                    .map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v))),
            )
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        // SAFETY: the closure runs in the forked child of this single-threaded process, and
        // `Privileges::apply` makes only async-signal-safe system calls and never allocates.
        // A failure makes `spawn` return it without exec: nothing runs with root left.
        unsafe {
            command.pre_exec(move || privileges.apply(&cwd));
        }
        let spawned = command.spawn();
        if has_channel {
            // Put /dev/null back, so the channel's only holder is the new process.
            dup3(&self.null, &mut self.fd3, OFlag::O_CLOEXEC)
                .map_err(|e| format!("restoring descriptor 3: {e}"))?;
        }
        Ok(match spawned {
            Ok(child) => {
                // Dropping `child` neither kills nor waits: this loop reaps it.
                self.running.insert(child.id(), id);
                Event::Spawned {
                    id,
                    pid: child.id(),
                }
            }
            Err(e) => Event::Failed {
                id,
                error: match self.privileges.run_as() {
                    Some(run_as) => format!(
                        "{e} (dropping to uid {} gid {}, installing the seccomp filter, entering the working directory or exec failed)",
                        run_as.uid, run_as.gid
                    ),
                    None => format!(
                        "{e} (installing the seccomp filter, entering the working directory or exec failed)"
                    ),
                },
            },
        })
    }

    /// Reaps every exited child; reports the ones the worker started.
    fn reap(&mut self) -> Result<(), String> {
        loop {
            let (pid, status) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, WireExit::Code(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, WireExit::Signal(signal as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(()),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(format!("waitpid: {e}")),
            };
            let pid = pid.as_raw() as u32;
            if self.running.remove(&pid).is_some()
                && !report(&self.control, &Event::Exited { pid, status })
            {
                return Err("the worker went away".into());
            }
        }
    }
}
