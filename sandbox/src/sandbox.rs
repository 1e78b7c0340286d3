//! The worker's side of a sandbox: starting its holder, asking it for processes, and tearing it
//! down.
//!
//! A sandbox owns two tasks on the caller's tokio runtime: a writer that sends queued requests
//! (so a cancelled caller never leaves half a frame on the socket) and a reader that routes the
//! holder's events to the right request or [`Process`]. Closing the socket is how a sandbox
//! ends: its PID 1 exits and the kernel kills everything left in the pid namespace.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::cgroup::{cgroup_support, Cgroup, Controller, Created};
use crate::config::{self, SandboxConfig};
use crate::error::SandboxError;
use crate::wire::{encode, Event, FrameBuffer, HolderConfig, Request, SpawnRequest, WireExit};

/// How long the holder may take to build the sandbox.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long destroy waits for the holder after closing the socket, and again after SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long removing the cgroup may wait for its last processes to go.
const CGROUP_REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A running app sandbox: namespaces, a private root, a cgroup, and a PID 1 that starts
/// processes inside on request.
///
/// End it with [`Sandbox::destroy`]. Dropping it also ends it (SIGKILL to the holder, cgroup
/// removed on a background thread) without waiting.
pub struct Sandbox {
    name: String,
    link: Arc<Link>,
    holder: Option<Child>,
    reader: Option<JoinHandle<()>>,
    cgroup: Option<Cgroup>,
}

/// A process to start in a sandbox.
#[derive(Debug)]
pub struct ProcessSpec {
    /// Program path inside the sandbox (absolute).
    pub program: PathBuf,
    /// Arguments after `argv[0]`.
    pub args: Vec<OsString>,
    /// The complete environment; nothing is inherited.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory inside the sandbox.
    pub cwd: PathBuf,
    /// Becomes the process's descriptor 3 (a socket to its zygote driver, say); without one
    /// the process has no descriptor 3.
    pub channel: Option<OwnedFd>,
    /// Become its stdin, stdout and stderr; without them all three are /dev/null.
    pub stdio: Option<StdioFds>,
}

/// The standard streams of a sandboxed process: descriptors of the caller's (pipes, say) that
/// become its descriptors 0, 1 and 2. The sandbox keeps no copy once the process has started.
#[derive(Debug)]
pub struct StdioFds {
    /// Becomes descriptor 0.
    pub stdin: OwnedFd,
    /// Becomes descriptor 1.
    pub stdout: OwnedFd,
    /// Becomes descriptor 2.
    pub stderr: OwnedFd,
}

/// A process id in the sandbox's pid namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessId(u32);

impl ProcessId {
    /// The pid as the sandbox's processes see it.
    pub fn as_raw(self) -> u32 {
        self.0
    }
}

impl std::fmt::Display for ProcessId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How a sandboxed process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal number (SIGKILL is 9; see [`Sandbox::oom_kills`] to tell
    /// an out-of-memory kill from others).
    Signaled(i32),
    /// The sandbox ended before the process's exit was reported.
    SandboxGone,
}

/// A process started with [`Sandbox::spawn`].
#[derive(Debug)]
pub struct Process {
    id: ProcessId,
    spawn_id: u64,
    link: Arc<Link>,
    exit: Option<oneshot::Receiver<Exit>>,
    outcome: Option<Exit>,
}

impl Sandbox {
    /// Builds a sandbox: checks the config, makes its cgroup with every limit, starts the
    /// holder inside it and waits until the root is built.
    ///
    /// Fails with [`SandboxError::Limits`] when a cgroup limit cannot be enforced, unless
    /// [`SandboxConfig::allow_unlimited`] is set (then it warns once and starts without them).
    pub async fn create(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        let holder_config = config::validate(&config)?;
        let cgroup = make_cgroup(&config).await?;
        match start_holder(&config, &holder_config, cgroup.as_ref()).await {
            Ok((holder, reader, writer, frames)) => {
                let link = Arc::new(Link::new(writer));
                let reader = tokio::spawn(read_events(
                    reader,
                    frames,
                    Arc::clone(&link),
                    config.name.clone(),
                ));
                Ok(Sandbox {
                    name: config.name,
                    link,
                    holder: Some(holder),
                    reader: Some(reader),
                    cgroup,
                })
            }
            Err(e) => {
                if let Some(cgroup) = cgroup {
                    remove_cgroup(cgroup).await?;
                }
                Err(e)
            }
        }
    }

    /// Starts `spec.program` inside the sandbox with `spec.channel` as its descriptor 3 and
    /// `spec.stdio` as its standard streams. All of them travel to the sandbox's PID 1 with
    /// the request itself; the caller's copies are closed once sent.
    pub async fn spawn(&self, spec: ProcessSpec) -> Result<Process, SandboxError> {
        let bytes = |s: &std::ffi::OsStr| s.as_bytes().to_vec();
        let (channel, stdio) = (spec.channel.is_some(), spec.stdio.is_some());
        // The order the holder takes them in: see `SpawnRequest`.
        let mut fds: Vec<OwnedFd> = spec.channel.into_iter().collect();
        if let Some(StdioFds {
            stdin,
            stdout,
            stderr,
        }) = spec.stdio
        {
            fds.extend([stdin, stdout, stderr]);
        }
        let (reply, replied) = oneshot::channel();
        let spawn_id = self.link.request(
            |id| {
                Request::Spawn(SpawnRequest {
                    id,
                    program: bytes(spec.program.as_os_str()),
                    args: spec.args.iter().map(|a| bytes(a)).collect(),
                    env: spec.env.iter().map(|(k, v)| (bytes(k), bytes(v))).collect(),
                    cwd: bytes(spec.cwd.as_os_str()),
                    channel,
                    stdio,
                })
            },
            fds,
            Pending::Spawn(reply),
        )?;
        match replied.await {
            Ok(Ok((pid, exit))) => Ok(Process {
                id: ProcessId(pid),
                spawn_id,
                link: Arc::clone(&self.link),
                exit: Some(exit),
                outcome: None,
            }),
            Ok(Err(reason)) => Err(SandboxError::Spawn {
                program: spec.program,
                reason,
            }),
            Err(_) => Err(SandboxError::Gone),
        }
    }

    /// Ends the sandbox: closes its control socket (PID 1 exits, the kernel kills every
    /// process inside), waits for the holder (SIGKILL after a grace period), removes the cgroup.
    pub async fn destroy(mut self) -> Result<(), SandboxError> {
        self.link.close();
        if let Some(mut holder) = self.holder.take() {
            if tokio::time::timeout(EXIT_GRACE, holder.wait())
                .await
                .is_err()
            {
                tracing::warn!(sandbox = %self.name, "holder did not exit after its socket closed; killing it");
                let _ = holder.start_kill();
                let _ = tokio::time::timeout(EXIT_GRACE, holder.wait()).await;
            }
        }
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
        match self.cgroup.take() {
            Some(cgroup) => remove_cgroup(cgroup).await,
            None => Ok(()),
        }
    }

    /// The app name the sandbox was made for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The memory limit the sandbox's cgroup enforces, or `None` when none is enforced.
    pub fn memory_limit(&self) -> Option<u64> {
        self.cgroup.as_ref().and_then(Cgroup::memory_limit)
    }

    /// How many processes the kernel has killed for exceeding the memory limit, so a SIGKILL
    /// can be reported as "out of memory". Always 0 without a memory cgroup.
    pub fn oom_kills(&self) -> u64 {
        self.cgroup.as_ref().map_or(0, Cgroup::oom_kills)
    }

    /// The sandbox's cgroup directories (one per v1 hierarchy, one for v2); empty without one.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cgroup
            .iter()
            .flat_map(|c| c.dirs().map(Path::to_path_buf))
            .collect()
    }

    /// The holder's pid on the host (in the worker's pid namespace).
    pub fn holder_pid(&self) -> Option<u32> {
        self.holder.as_ref().and_then(Child::id)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.link.close();
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
        if let Some(mut holder) = self.holder.take() {
            // PID 1 dies with the holder (parent-death signal), taking the namespace along;
            // tokio reaps the holder in the background.
            let _ = holder.start_kill();
        }
        if let Some(cgroup) = self.cgroup.take() {
            let name = self.name.clone();
            std::thread::spawn(move || {
                if let Err(e) = cgroup.remove(CGROUP_REMOVE_TIMEOUT) {
                    tracing::warn!(sandbox = %name, "dropped sandbox left its cgroup behind: {e}");
                }
            });
        }
    }
}

impl Process {
    /// The process's pid in the sandbox's namespace.
    pub fn id(&self) -> ProcessId {
        self.id
    }

    /// SIGKILLs the process and its process group. Succeeds also when it has already exited.
    pub async fn kill(&self) -> Result<(), SandboxError> {
        if self.outcome.is_some() {
            return Ok(());
        }
        let (reply, replied) = oneshot::channel();
        let spawn_id = self.spawn_id;
        self.link.request(
            |id| Request::Kill { id, spawn_id },
            Vec::new(),
            Pending::Kill(reply),
        )?;
        match replied.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(SandboxError::Kill {
                pid: self.id.0,
                reason,
            }),
            Err(_) => Err(SandboxError::Gone),
        }
    }

    /// Waits until the process ends. Cancel-safe; later calls return the same value.
    pub async fn wait(&mut self) -> Exit {
        if let Some(outcome) = self.outcome {
            return outcome;
        }
        let outcome = match self.exit.as_mut() {
            Some(exit) => exit.await.unwrap_or(Exit::SandboxGone),
            None => Exit::SandboxGone,
        };
        self.exit = None;
        self.outcome = Some(outcome);
        outcome
    }
}

/// Makes the sandbox's cgroup. Where a limit cannot be enforced, refuses the sandbox, or, if
/// the operator allowed it, says once per process which limits go unenforced and why.
async fn make_cgroup(config: &SandboxConfig) -> Result<Option<Cgroup>, SandboxError> {
    let support = cgroup_support();
    let (cgroup, unenforced) = match Cgroup::create(&support, &config.name, &config.limits) {
        Ok(Created { cgroup, unenforced }) => (Some(cgroup), unenforced),
        Err(e) => {
            let all = Controller::ALL.map(|c| (c, e.to_string()));
            (None, all.to_vec())
        }
    };
    match check_enforced(&config.name, &unenforced, config.allow_unlimited) {
        Ok(()) => Ok(cgroup),
        Err(e) => {
            if let Some(cgroup) = cgroup {
                remove_cgroup(cgroup).await?;
            }
            Err(e)
        }
    }
}

/// Decides whether a sandbox may start with `unenforced` limits (each controller with the
/// reason it cannot be used): with none, yes; with some, only if `allow_unlimited`, and then
/// with a warning once per process.
fn check_enforced(
    name: &str,
    unenforced: &[(Controller, String)],
    allow_unlimited: bool,
) -> Result<(), SandboxError> {
    if unenforced.is_empty() {
        return Ok(());
    }
    let limits: Vec<&str> = unenforced.iter().map(|(c, _)| c.name()).collect();
    let mut reasons: Vec<&str> = unenforced.iter().map(|(_, why)| why.as_str()).collect();
    reasons.dedup();
    let (limits, reason) = (limits.join(", "), reasons.join("; "));
    if !allow_unlimited {
        return Err(SandboxError::Limits {
            name: name.to_owned(),
            limits,
            reason,
        });
    }
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            sandbox = name,
            unenforced = limits,
            reason,
            "sandbox resource limits are NOT enforced (allowed by --allow-unlimited): sandboxes start without them (said once per process)"
        );
    }
    Ok(())
}

async fn remove_cgroup(cgroup: Cgroup) -> Result<(), SandboxError> {
    tokio::task::spawn_blocking(move || cgroup.remove(CGROUP_REMOVE_TIMEOUT))
        .await
        .map_err(|e| SandboxError::Io(std::io::Error::other(e)))?
}

/// Starts the holder in the cgroup, sends its config, and waits for `Ready`.
async fn start_holder(
    config: &SandboxConfig,
    holder_config: &HolderConfig,
    cgroup: Option<&Cgroup>,
) -> Result<(Child, OwnedReadHalf, OwnedWriteHalf, FrameBuffer), SandboxError> {
    // Both ends are close-on-exec; the holder gets its end as stdin (posix_spawn can do that
    // without running code in the forked child, unlike placing it at descriptor 3).
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let holder = tokio::process::Command::new(&config.init_program)
        .args(&config.init_args)
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SandboxError::StartHolder {
            program: config.init_program.clone(),
            source,
        })?;
    // The holder blocks reading its config, so it runs nothing before it is in the cgroup.
    if let (Some(cgroup), Some(pid)) = (cgroup, holder.id()) {
        cgroup.add(pid)?;
    }
    ours.set_nonblocking(true)?;
    let (mut reader, mut writer) = tokio::net::UnixStream::from_std(ours)?.into_split();
    let setup_failed = |reason: String| SandboxError::Setup {
        name: config.name.clone(),
        reason,
    };
    let frame = encode(holder_config).map_err(|e| SandboxError::Protocol(e.to_string()))?;
    writer.write_all(&frame).await.map_err(|e| {
        setup_failed(format!("the holder exited before taking its config ({e}); is it a program that calls init_main?"))
    })?;
    let mut frames = FrameBuffer::default();
    let first = tokio::time::timeout(SETUP_TIMEOUT, async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(event) = frames
                .next::<Event>()
                .map_err(|e| SandboxError::Protocol(e.to_string()))?
            {
                return Ok(event);
            }
            match reader.read(&mut chunk).await {
                Ok(0) => {
                    return Err(setup_failed(
                        "the holder exited during setup (its stderr says why)".into(),
                    ))
                }
                Ok(n) => frames.push(&chunk[..n]),
                // A holder that exits with our config unread resets the connection.
                Err(e) => {
                    return Err(setup_failed(format!(
                        "the holder exited during setup ({e}; its stderr says why)"
                    )))
                }
            }
        }
    })
    .await
    .map_err(|_| {
        setup_failed(format!(
            "no answer from the holder within {SETUP_TIMEOUT:?}"
        ))
    })??;
    match first {
        Event::Ready => Ok((holder, reader, writer, frames)),
        Event::SetupFailed(reason) => Err(setup_failed(reason)),
        other => Err(SandboxError::Protocol(format!(
            "expected Ready, got {other:?}"
        ))),
    }
}

/// The connection to a sandbox's PID 1, shared by the sandbox and its processes.
#[derive(Debug)]
struct Link {
    state: Mutex<LinkState>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct LinkState {
    /// Requests for the writer task; `None` once the sandbox is closing or gone.
    outgoing: Option<mpsc::UnboundedSender<Outgoing>>,
    pending: HashMap<u64, Pending>,
    /// Where each running process's exit goes, by pid.
    exits: HashMap<u32, oneshot::Sender<Exit>>,
}

/// A request awaiting its reply.
#[derive(Debug)]
enum Pending {
    Spawn(oneshot::Sender<Result<(u32, oneshot::Receiver<Exit>), String>>),
    Kill(oneshot::Sender<Result<(), String>>),
}

/// One frame to send, with the descriptors that ride on it.
#[derive(Debug)]
struct Outgoing {
    frame: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Link {
    fn new(writer: OwnedWriteHalf) -> Link {
        let (outgoing, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_requests(writer, queue));
        Link {
            state: Mutex::new(LinkState {
                outgoing: Some(outgoing),
                pending: HashMap::new(),
                exits: HashMap::new(),
            }),
            next_id: AtomicU64::new(1),
        }
    }

    fn state(&self) -> MutexGuard<'_, LinkState> {
        // The state stays consistent across a panic elsewhere: every update is one insert or remove.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a request; returns its id. The reply goes to `pending`.
    fn request(
        &self,
        build: impl FnOnce(u64) -> Request,
        fds: Vec<OwnedFd>,
        pending: Pending,
    ) -> Result<u64, SandboxError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&build(id)).map_err(|e| SandboxError::Protocol(e.to_string()))?;
        let mut state = self.state();
        let outgoing = state.outgoing.as_ref().ok_or(SandboxError::Gone)?;
        outgoing
            .send(Outgoing { frame, fds })
            .map_err(|_| SandboxError::Gone)?;
        state.pending.insert(id, pending);
        Ok(id)
    }

    /// Routes one event from PID 1.
    fn route(&self, event: Event, sandbox: &str) {
        let mut state = self.state();
        match event {
            Event::Spawned { id, pid } => {
                if let Some(Pending::Spawn(reply)) = state.pending.remove(&id) {
                    let (exited, exit) = oneshot::channel();
                    state.exits.insert(pid, exited);
                    let _ = reply.send(Ok((pid, exit)));
                }
            }
            Event::Killed { id } => {
                if let Some(Pending::Kill(reply)) = state.pending.remove(&id) {
                    let _ = reply.send(Ok(()));
                }
            }
            Event::Failed { id, error } => match state.pending.remove(&id) {
                Some(Pending::Spawn(reply)) => drop(reply.send(Err(error))),
                Some(Pending::Kill(reply)) => drop(reply.send(Err(error))),
                None => {}
            },
            Event::Exited { pid, status } => {
                if let Some(exited) = state.exits.remove(&pid) {
                    let _ = exited.send(match status {
                        WireExit::Code(code) => Exit::Exited(code),
                        WireExit::Signal(signal) => Exit::Signaled(signal),
                    });
                }
            }
            Event::Ready | Event::SetupFailed(_) => {
                tracing::warn!(sandbox, ?event, "unexpected event from the sandbox holder");
            }
        }
    }

    /// Stops sending (the writer then closes the socket) and fails everything waiting.
    fn close(&self) {
        let mut state = self.state();
        state.outgoing = None;
        state.pending.clear();
        state.exits.clear();
    }
}

/// Sends queued requests in order; closes the socket's write side when the queue ends.
async fn write_requests(mut writer: OwnedWriteHalf, mut queue: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(Outgoing { frame, fds }) = queue.recv().await {
        if let Err(e) = send_frame(&mut writer, &frame, fds).await {
            tracing::debug!("sandbox control socket closed while sending: {e}");
            break;
        }
    }
    let _ = writer.shutdown().await;
}

/// Writes one frame; its descriptors ride on its first bytes (one SCM_RIGHTS message).
async fn send_frame(
    writer: &mut OwnedWriteHalf,
    frame: &[u8],
    fds: Vec<OwnedFd>,
) -> std::io::Result<()> {
    let mut sent = 0;
    if !fds.is_empty() {
        let stream: &tokio::net::UnixStream = writer.as_ref();
        let raw = stream.as_raw_fd();
        let raw_fds: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        sent = stream
            .async_io(Interest::WRITABLE, || {
                let rights = [ControlMessage::ScmRights(&raw_fds)];
                sendmsg::<()>(
                    raw,
                    &[IoSlice::new(frame)],
                    &rights,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            })
            .await?;
        // Our copies close here; the holder has its own now.
        drop(fds);
    }
    writer.write_all(&frame[sent..]).await
}

/// Routes PID 1's events until the socket closes; then fails whatever still waits.
async fn read_events(
    mut reader: OwnedReadHalf,
    mut frames: FrameBuffer,
    link: Arc<Link>,
    sandbox: String,
) {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        loop {
            match frames.next::<Event>() {
                Ok(Some(event)) => link.route(event, &sandbox),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(sandbox, "sandbox holder broke the control protocol: {e}");
                    link.close();
                    return;
                }
            }
        }
        match reader.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => frames.push(&chunk[..n]),
            Err(e) => {
                tracing::warn!(sandbox, "reading the sandbox control socket: {e}");
                break;
            }
        }
    }
    link.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unenforced_limits_refuse_the_sandbox_unless_allowed() {
        assert!(check_enforced("app", &[], false).is_ok());
        let missing = [
            (Controller::Cpu, "no cgroup v1 hierarchy mounted".to_owned()),
            (
                Controller::Pids,
                "no cgroup v1 hierarchy mounted".to_owned(),
            ),
        ];
        match check_enforced("app", &missing, false) {
            Err(e @ SandboxError::Limits { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains(
                        "cannot enforce its cpu, pids limits: no cgroup v1 hierarchy mounted."
                    ) && message.contains("--allow-unlimited"),
                    "{message}"
                );
            }
            other => panic!("not refused: {other:?}"),
        }
        assert!(check_enforced("app", &missing, true).is_ok());
    }
}
