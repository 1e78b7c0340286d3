//! How a grain's process is started: the [`Launcher`] seam between the runtimes and the place
//! they run (an app sandbox, or the host itself with [`HostLauncher`]).
//!
//! A launcher starts a program with a channel socket as its fd 3 and, for the `exec` runtime,
//! pipes as its stdin, stdout and stderr. It never forks the calling (tokio) process without an
//! immediate exec.

#![allow(unsafe_code)] // `pre_exec` plumbing of fd 3: only dup2/fcntl between fork and exec.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

/// A boxed future, as the launcher traits return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What to start: the program, its arguments, environment and working directory, the socket
/// that becomes its fd 3 and its standard streams. One shape for the host and for sandboxes;
/// without stdio, the host gives a process `/dev/null` for stdin and the launcher's own
/// stdout and stderr, and a sandbox `/dev/null` for all three.
pub use sand_sandbox::{ProcessSpec, StdioFds};

/// How a process ended.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Exit {
    /// It exited with this status.
    Exited(i32),
    /// This signal killed it.
    Signaled(i32),
    /// Its end is unknown: the place it ran in (a sandbox) went away.
    Gone,
}

impl Exit {
    /// Whether SIGKILL ended it (the kernel's OOM killer, a timeout, or `kill -9`).
    pub fn is_sigkill(self) -> bool {
        self == Exit::Signaled(Signal::SIGKILL as i32)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Exit::Exited(code) => write!(f, "exited with status {code}"),
            Exit::Signaled(sig) => match Signal::try_from(sig) {
                Ok(signal) => write!(f, "killed by {}", signal.as_str()),
                Err(_) => write!(f, "killed by signal {sig}"),
            },
            Exit::Gone => f.write_str("gone with its sandbox"),
        }
    }
}

/// Starts processes somewhere: on the host, or in an app sandbox.
pub trait Launcher: Send + Sync + 'static {
    /// Starts `spec`. The returned process is already running.
    fn spawn(&self, spec: ProcessSpec) -> BoxFuture<'_, io::Result<Box<dyn LaunchedProcess>>>;
}

/// A started process.
pub trait LaunchedProcess: Send + Sync {
    /// Kills it and every process it started (SIGKILL). Killing a process that has ended is
    /// not an error.
    fn kill(&self) -> io::Result<()>;

    /// Resolves when it has ended; can be awaited from several places, and again after it ended.
    fn wait(&self) -> BoxFuture<'_, Exit>;
}

/// Starts processes directly on the host (`--isolation none`), each in a process group of its
/// own so that `kill` reaches its descendants too.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostLauncher;

impl Launcher for HostLauncher {
    fn spawn(&self, spec: ProcessSpec) -> BoxFuture<'_, io::Result<Box<dyn LaunchedProcess>>> {
        Box::pin(async move {
            let process = spawn_on_host(spec)?;
            Ok(Box::new(process) as Box<dyn LaunchedProcess>)
        })
    }
}

/// Spawns `cmd`, trying again a few times while exec fails with ETXTBSY. A program written
/// just before (an unpacked bundle, a test's script) is "busy" while any child forked
/// meanwhile by another thread still holds the writer's descriptor between its fork and exec;
/// that lasts microseconds, so a short retry is the known remedy.
fn spawn_retrying_busy(cmd: &mut tokio::process::Command) -> io::Result<tokio::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(1 << tries.min(4)));
            }
            result => return result,
        }
    }
}

fn spawn_on_host(spec: ProcessSpec) -> io::Result<HostProcess> {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .process_group(0);
    match spec.stdio {
        Some(stdio) => {
            cmd.stdin(Stdio::from(stdio.stdin))
                .stdout(Stdio::from(stdio.stdout))
                .stderr(Stdio::from(stdio.stderr));
        }
        None => {
            cmd.stdin(Stdio::null());
        }
    }
    if let Some(channel) = &spec.channel {
        let fd = channel.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and makes only the
        // async-signal-safe syscalls dup2 and fcntl; it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                if fd == CHANNEL_FD {
                    // dup2 onto itself would keep FD_CLOEXEC: clear the flag instead.
                    if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                } else if nix::libc::dup2(fd, CHANNEL_FD) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = spawn_retrying_busy(&mut cmd).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", spec.program.display()),
        )
    })?;
    drop(spec.channel); // The child has its own copy now.
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("the started process has no pid"))?;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let exit = match child.wait().await {
            Ok(status) => exit_of(status),
            Err(_) => Exit::Gone,
        };
        let _ = tx.send(Some(exit));
    });
    Ok(HostProcess {
        group: Pid::from_raw(pid as i32),
        exit: rx,
        group_killed_after_exit: AtomicBool::new(false),
    })
}

const CHANNEL_FD: i32 = sand_grain::wire::CHANNEL_FD;

fn exit_of(status: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Exited(code),
        (None, Some(sig)) => Exit::Signaled(sig),
        (None, None) => Exit::Gone,
    }
}

/// A process started by [`HostLauncher`]: the leader of its own process group.
struct HostProcess {
    group: Pid,
    exit: watch::Receiver<Option<Exit>>,
    /// Once the leader is reaped its id may be reused; the group is killed at most once more
    /// after that (for orphans still in it), never again.
    group_killed_after_exit: AtomicBool,
}

impl LaunchedProcess for HostProcess {
    fn kill(&self) -> io::Result<()> {
        let exited = self.exit.borrow().is_some();
        if exited && self.group_killed_after_exit.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        match killpg(self.group, Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    fn wait(&self) -> BoxFuture<'_, Exit> {
        let mut rx = self.exit.clone();
        Box::pin(async move {
            match rx.wait_for(Option::is_some).await {
                Ok(exit) => exit.unwrap_or(Exit::Gone),
                Err(_) => Exit::Gone,
            }
        })
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        // Nothing a launcher started may outlive its handle.
        let _ = self.kill();
    }
}
