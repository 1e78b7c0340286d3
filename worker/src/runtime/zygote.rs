//! The host side of one grain's zygote (the `python` and `rust` runtimes).
//!
//! A zygote is a single-threaded process started by exec (never a fork of the worker) that
//! loads the grain once and forks instances. The worker talks to it over a `SOCK_SEQPACKET`
//! socket that is the zygote's fd 3, in the wire of [`sand_grain::wire`]. The zygote hands the
//! worker each instance's private socket (`SPARE`), so a call goes straight from the worker to a
//! spare instance it holds, and the zygote is not on the call's path; the instance writes its
//! result straight back on that socket, where the worker takes only the result of the call the
//! instance holds (fd 3 is the zygote's alone: an instance closes its copy before any handler
//! code runs). Once the result is out, the worker keeps the instance for its next
//! call (`reuse`) or closes its socket (it exits), and asks for the next spare (`WANT`). A call
//! for which no spare is held goes to the zygote (`CALL`), which forks an instance for it. The
//! zygote reports every instance's end (`DIED`); the worker knows which call each instance
//! has. Calls run concurrently up to the grain's `concurrency`; more wait in line, in order.
//!
//! A call starts when its frame is written whole to an instance's socket. A spare found dead
//! before that (its `DIED` came first, or the write failed) never had the call: the call goes to
//! another spare or to the zygote, with no error and on the same attempt. An instance that dies
//! after the write has crashed the call (its handler may have run).
//!
//! [`Zygote::call`] always returns a report: a dead zygote fails the calls in flight with
//! `Crashed` and is started again on the next call; a zygote that breaks the wire (a message
//! malformed, of a kind it must not send, in pieces where it is one, or with fds its kind does
//! not carry) is killed, its calls fail with `BadOutput`, and every fd it sent is closed. An
//! instance that breaks the wire (a result for a call it does not hold, a second one, one above
//! [`RESULT_BYTES_MAX`]) is killed and its own call fails with `BadOutput`; the other calls go
//! on.
//!
//! What the worker holds for a zygote is bounded: nothing of fd 3 after `READY` (a `DIED` and a
//! `SPARE` are one piece each), at most [`HELLO_BYTES_MAX`] before it, and per instance at most
//! the one result it owes, read as it comes; [`Zygote::stats`] counts it.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, MsgFlags, Shutdown, SockFlag, SockType};
use sand_grain::wire::{
    parse_piece, parse_private_head, pieces, private_frame, CallMsg, DiedMsg, End, KillMsg, Kind,
    Reassembler, ResultMsg, SpareMsg, WireError, HEADER_BYTES, HELLO_BYTES_MAX,
    PIECE_BODY_BYTES_MAX, PRIVATE_HEAD_BYTES, RESULT_BYTES_MAX,
};
use sand_protocol::wire::{ErrorKind, GrainError};
use tokio::io::Interest;
use tokio::net::{UnixDatagram, UnixStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use super::fd_passing::{self, Received};
use super::handoff::{Ended, HandOff, Policy, Route, Spare, Written};
use super::launch::{Exit, LaunchedProcess, Launcher, ProcessSpec};
use super::{bounded_capture, output, CallReport, CallRequest};

/// The variables that size the thread pools of numeric libraries, set to 1 for Python
/// zygotes unless the app sets them.
const SINGLE_THREADED_POOLS: [&str; 3] =
    ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"];

/// How to start one grain's zygote.
#[derive(Clone, Debug)]
pub struct ZygoteSpec {
    /// Which runtime, and what it loads.
    pub runtime: ZygoteRuntime,
    /// The app directory, as the zygote sees it; its working directory.
    pub app_dir: PathBuf,
    /// How many calls may run at once; more wait in line.
    pub concurrency: usize,
    /// How many calls one forked instance serves before it exits (1: a fresh process per call).
    pub reuse: u32,
    /// Keep one instance forked ahead (the default). Off, the zygote forks when a call arrives
    /// and the instance exits as soon as it answers: SAND's behaviour, kept for benchmarks.
    pub prefork: bool,
    /// How many instances are kept forked ahead (with `prefork`; at least 1). More than one
    /// gives each spare more time to be forked and ready before a call takes it, at the cost
    /// of an idle instance's memory.
    pub spares: u32,
    /// The zygote's whole environment.
    pub env: Vec<(OsString, OsString)>,
    /// How long loading the grain may take.
    pub start_timeout: Duration,
}

/// What a zygote runs.
#[derive(Clone, Debug)]
pub enum ZygoteRuntime {
    /// `python -u sand_runtime.py`, loading `handler` from `module`.
    Python {
        /// The interpreter (the manifest's `python`, or `python3`).
        interpreter: PathBuf,
        /// Where [`super::python::install_python_runtime`] put the runtime script.
        runtime_script: PathBuf,
        /// The module file, relative to the app directory (`grains.py`, `pkg/mod.py`).
        module: String,
        /// The handler function's name.
        handler: String,
    },
    /// A binary built with the `sand-grain` crate, whose `main` calls `serve(handler)`.
    Rust {
        /// The binary.
        binary: PathBuf,
    },
}

impl ZygoteSpec {
    /// A spec with the defaults: 8 calls at once, a fresh instance per call, one instance
    /// forked ahead, a 30 s load timeout, and an environment of `PATH` and `LANG` only.
    pub fn new(runtime: ZygoteRuntime, app_dir: impl Into<PathBuf>) -> Self {
        Self {
            runtime,
            app_dir: app_dir.into(),
            concurrency: 8,
            reuse: 1,
            prefork: true,
            spares: 1,
            env: vec![
                ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
                ("LANG".into(), "C.UTF-8".into()),
            ],
            start_timeout: Duration::from_secs(30),
        }
    }

    /// The environment the zygote starts with: the spec's, plus, for Python, one thread for
    /// the numeric libraries' pools (OpenBLAS, OpenMP, MKL) unless the spec sets them. A
    /// zygote must be single-threaded when it forks, and importing numpy otherwise starts an
    /// OpenBLAS thread in it.
    fn launch_env(&self) -> Vec<(OsString, OsString)> {
        let mut env = self.env.clone();
        if matches!(self.runtime, ZygoteRuntime::Python { .. }) {
            for key in SINGLE_THREADED_POOLS {
                if !env.iter().any(|(k, _)| k == key) {
                    env.push((key.into(), "1".into()));
                }
            }
        }
        env
    }

    fn command(&self) -> (PathBuf, Vec<OsString>) {
        let mut common: Vec<OsString> =
            vec!["--reuse".into(), self.reuse.max(1).to_string().into()];
        if !self.prefork {
            common.push("--fork-on-demand".into());
        }
        match &self.runtime {
            ZygoteRuntime::Python {
                interpreter,
                runtime_script,
                module,
                handler,
            } => {
                let mut args: Vec<OsString> = vec![
                    "-u".into(),
                    runtime_script.into(),
                    "--app-dir".into(),
                    self.app_dir.clone().into(),
                    "--module".into(),
                    module.into(),
                    "--handler".into(),
                    handler.into(),
                ];
                args.extend(common);
                (interpreter.clone(), args)
            }
            ZygoteRuntime::Rust { binary } => (binary.clone(), common),
        }
    }
}

/// Why a zygote could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// The launcher could not start the process.
    #[error("cannot start the zygote: {0}")]
    Spawn(io::Error),
    /// The channel socket could not be made or used.
    #[error("the zygote's channel failed: {0}")]
    Channel(io::Error),
    /// The grain did not load (the module raised, the handler is missing, ...).
    #[error("the grain failed to load: {0}")]
    Load(String),
    /// The zygote ended before saying it was ready.
    #[error("the zygote {0} before it was ready")]
    ExitedEarly(Exit),
    /// The zygote did not get ready in time.
    #[error("the zygote was not ready within {} ms", .0.as_millis())]
    StartTimeout(Duration),
    /// The zygote said something other than ready or load-failed.
    #[error("the zygote broke the wire while starting: {0}")]
    Wire(WireError),
}

/// What the worker holds, and has refused, for one grain's zygote (over all its lives).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZygoteStats {
    /// Bytes of instances' results being read now.
    pub result_bytes: usize,
    /// The most bytes of results ever being read at once.
    pub result_bytes_peak: usize,
    /// Instances killed for breaking the wire.
    pub broken_instances: u64,
}

#[derive(Default)]
struct Counters {
    result_bytes: AtomicUsize,
    result_bytes_peak: AtomicUsize,
    broken_instances: AtomicU64,
}

/// Bytes of a result being read, counted in [`Counters`] until dropped.
struct HeldBytes<'a> {
    counters: &'a Counters,
    bytes: usize,
}

impl HeldBytes<'_> {
    fn add(&mut self, bytes: usize) {
        self.bytes += bytes;
        let now = self
            .counters
            .result_bytes
            .fetch_add(bytes, Ordering::Relaxed)
            + bytes;
        self.counters
            .result_bytes_peak
            .fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&mut self, bytes: usize) {
        self.bytes -= bytes;
        self.counters
            .result_bytes
            .fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl Drop for HeldBytes<'_> {
    fn drop(&mut self) {
        self.sub(self.bytes);
    }
}

/// One grain's zygote, started again whenever it is found dead.
pub struct Zygote {
    launcher: Arc<dyn Launcher>,
    spec: ZygoteSpec,
    counters: Arc<Counters>,
    line: Semaphore,
    current: Mutex<Option<Arc<Running>>>,
    restart: tokio::sync::Mutex<()>,
}

impl Zygote {
    /// Starts the zygote and waits until the grain is loaded.
    pub async fn start(
        launcher: Arc<dyn Launcher>,
        spec: ZygoteSpec,
    ) -> Result<Zygote, ZygoteError> {
        let counters = Arc::new(Counters::default());
        let running = Running::start(launcher.as_ref(), &spec, counters.clone()).await?;
        Ok(Zygote {
            line: Semaphore::new(spec.concurrency.max(1)),
            launcher,
            spec,
            counters,
            current: Mutex::new(Some(running)),
            restart: tokio::sync::Mutex::new(()),
        })
    }

    /// Runs one call: waits in line for a free place, then for the result, the instance's
    /// death, or the timeout. Never panics; every failure is a `GrainResult::Error`.
    pub async fn call(&self, request: CallRequest) -> CallReport {
        let Ok(_place) = self.line.acquire().await else {
            let error = GrainError::new(ErrorKind::Unavailable, "the grain's zygote was stopped");
            return CallReport::failed(error, Instant::now());
        };
        let started = Instant::now();
        match self.running().await {
            Ok(running) => running.call(request, started).await,
            Err(e) => CallReport::failed(
                GrainError::new(ErrorKind::Unavailable, e.to_string()),
                started,
            ),
        }
    }

    /// Whether the zygote process is running (a dead one is started again on the next call).
    pub fn is_alive(&self) -> bool {
        self.live().is_some()
    }

    /// The zygote's pid as it sees itself (in its sandbox's pid namespace), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.live().map(|r| r.pid)
    }

    /// What the worker holds, and has refused, for this grain.
    pub fn stats(&self) -> ZygoteStats {
        ZygoteStats {
            result_bytes: self.counters.result_bytes.load(Ordering::Relaxed),
            result_bytes_peak: self.counters.result_bytes_peak.load(Ordering::Relaxed),
            broken_instances: self.counters.broken_instances.load(Ordering::Relaxed),
        }
    }

    /// Kills the zygote and every instance, waits (bounded) for it to end, and refuses later
    /// calls with `Unavailable`.
    pub async fn stop(&self) {
        self.line.close();
        let running = lock(&self.current).take();
        if let Some(running) = running {
            running.stop().await;
        }
    }

    fn live(&self) -> Option<Arc<Running>> {
        lock(&self.current).clone().filter(|r| r.is_alive())
    }

    async fn running(&self) -> Result<Arc<Running>, ZygoteError> {
        if let Some(running) = self.live() {
            return Ok(running);
        }
        let _one_start_at_a_time = self.restart.lock().await;
        if let Some(running) = self.live() {
            return Ok(running);
        }
        tracing::info!(grain = ?self.spec.runtime, "starting the grain's zygote again");
        let running =
            Running::start(self.launcher.as_ref(), &self.spec, self.counters.clone()).await?;
        *lock(&self.current) = Some(running.clone());
        Ok(running)
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        if let Some(running) = lock(&self.current).take() {
            running.shut_down(GrainError::new(
                ErrorKind::Unavailable,
                "the zygote was dropped",
            ));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded maps stay consistent at every step: a panic elsewhere cannot corrupt them.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A call handed to an instance (or to the zygote) and not yet answered; if its future is
/// dropped first, the call's instance is killed (a kill is one datagram, sent without waiting).
struct Pending<'a> {
    running: &'a Running,
    slot: u32,
    settled: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.settled {
            if let Some(number) = self.running.abandon(self.slot) {
                let body = KillMsg { instance: number }.encode();
                for piece in pieces(Kind::Kill, self.slot, &body) {
                    let _ = self.running.chan.try_send(&piece);
                }
            }
        }
    }
}

/// How many spares one call tries before it goes to the zygote: each one it tried was found
/// dead before the call reached it. The bound is for a zygote that sends only dead spares.
const SPARES_TRIED_MAX: u32 = 3;

/// How long a call waits for the spare on its way before it asks the zygote to fork one for
/// it. A working zygote forks the spare first in any case (it reads its channel in order), so
/// waiting never delays a call; the bound is for a zygote that ignores `WANT`.
const SPARE_WAIT_MAX: Duration = Duration::from_millis(250);

/// One life of the zygote process.
struct Running {
    pid: u32,
    chan: UnixDatagram,
    process: Arc<dyn LaunchedProcess>,
    counters: Arc<Counters>,
    state: Mutex<State>,
    reader: Mutex<Option<JoinHandle<()>>>,
    /// Set when the worker stops the zygote itself: its end is then expected, not news.
    stopping: AtomicBool,
}

/// The hand-off bookkeeping, shared by the call futures and the reader and exit-watcher tasks
/// (each of its methods is one critical section).
type State = HandOff<Arc<Line>, oneshot::Sender<Reply>, oneshot::Sender<Held>, GrainError>;

/// An instance whose private socket the worker holds (the only copy: closing it ends the
/// instance).
type Held = super::handoff::Held<Arc<Line>>;

/// An instance's private socket, as the worker holds it: calls are written to it, and the
/// instance's reader task ([`read_instance`]) reads its results from it. Dropping the last copy
/// shuts the socket down both ways: the instance reads end-of-file and exits, and its reader
/// reads what is left, then end-of-file, and ends (closing the socket with its copy).
struct Line(Arc<UnixStream>);

impl Drop for Line {
    fn drop(&mut self) {
        let _ = nix::sys::socket::shutdown(self.0.as_raw_fd(), Shutdown::Both);
    }
}

enum Reply {
    Result(ResultMsg),
    Died(Exit),
    Failed(GrainError),
}

impl Running {
    async fn start(
        launcher: &dyn Launcher,
        spec: &ZygoteSpec,
        counters: Arc<Counters>,
    ) -> Result<Arc<Running>, ZygoteError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| ZygoteError::Channel(e.into()))?;
        // std and tokio have no seqpacket type; a connected datagram socket's send and recv
        // are the same syscalls, and keep each datagram whole.
        let ours = std::os::unix::net::UnixDatagram::from(ours);
        ours.set_nonblocking(true).map_err(ZygoteError::Channel)?;
        let chan = UnixDatagram::from_std(ours).map_err(ZygoteError::Channel)?;
        let (program, args) = spec.command();
        let process: Arc<dyn LaunchedProcess> = Arc::from(
            launcher
                .spawn(ProcessSpec {
                    program,
                    args,
                    env: spec.launch_env(),
                    cwd: spec.app_dir.clone(),
                    channel: Some(theirs),
                    stdio: None,
                })
                .await
                .map_err(ZygoteError::Spawn)?,
        );
        let hello = tokio::time::timeout(spec.start_timeout, async {
            tokio::select! {
                biased;
                hello = read_hello(&chan) => match hello {
                    Err(Hello::Closed) => {
                        let exit = tokio::time::timeout(Duration::from_secs(2), process.wait()).await;
                        Err(ZygoteError::ExitedEarly(exit.unwrap_or(Exit::Gone)))
                    }
                    Err(Hello::Failed(e)) => Err(e),
                    Ok(pid) => Ok(pid),
                },
                exit = process.wait() => {
                    // Its last words (LOAD_FAILED) may be waiting in the socket still.
                    let last = tokio::time::timeout(Duration::from_millis(200), read_hello(&chan)).await;
                    match last {
                        Ok(Err(Hello::Failed(e))) => Err(e),
                        _ => Err(ZygoteError::ExitedEarly(exit)),
                    }
                }
            }
        })
        .await
        .unwrap_or(Err(ZygoteError::StartTimeout(spec.start_timeout)));
        let pid = match hello {
            Ok(pid) => pid,
            Err(e) => {
                let _ = process.kill();
                return Err(e);
            }
        };
        let running = Arc::new(Running {
            pid,
            chan,
            process,
            counters,
            state: Mutex::new(State::new(Policy {
                reuse: if spec.prefork { spec.reuse.max(1) } else { 1 },
                prefork: spec.prefork,
                spares: if spec.prefork { spec.spares.max(1) } else { 0 },
            })),
            reader: Mutex::new(None),
            stopping: AtomicBool::new(false),
        });
        *lock(&running.reader) = Some(tokio::spawn(read_results(running.clone())));
        tokio::spawn(watch_exit(running.clone()));
        running.keep_spare().await;
        Ok(running)
    }

    fn is_alive(&self) -> bool {
        lock(&self.state).dead().is_none()
    }

    async fn call(&self, request: CallRequest, started: Instant) -> CallReport {
        let (tx, rx) = oneshot::channel();
        let opened = lock(&self.state).open(tx);
        let slot = match opened {
            Ok(slot) => slot,
            Err(error) => return CallReport::failed(error, started),
        };
        // From here on, a drop (the worker aborted the attempt) kills the call's instance.
        let mut pending = Pending {
            running: self,
            slot,
            settled: false,
        };
        let body = CallMsg {
            exec: request.exec,
            trace: request.trace,
            call: request.call.0,
            attempt: request.attempt.0,
            input: request.input.0.to_vec(),
        }
        .encode();
        let exchange = async {
            self.hand_over(slot, &body).await?;
            Ok::<_, io::Error>(rx.await)
        };
        let exchanged = match request.timeout {
            None => exchange.await,
            Some(limit) => match tokio::time::timeout(limit, exchange).await {
                Ok(exchanged) => exchanged,
                Err(_) => {
                    pending.settled = true;
                    if let Some(number) = self.abandon(slot) {
                        let _ = self
                            .send(Kind::Kill, slot, &KillMsg { instance: number }.encode())
                            .await;
                    }
                    let error = GrainError::new(
                        ErrorKind::Timeout,
                        format!("ran past {} ms", limit.as_millis()),
                    );
                    return CallReport::failed(error, started);
                }
            },
        };
        let reply = match exchanged {
            Ok(reply) => reply,
            Err(e) => {
                pending.settled = true;
                let _ = lock(&self.state).settle(slot);
                let error = GrainError::new(
                    ErrorKind::Crashed,
                    format!("the zygote is unreachable: {e}"),
                );
                return CallReport::failed(error, started);
            }
        };
        pending.settled = true;
        match reply {
            Ok(Reply::Result(msg)) => CallReport {
                result: output::parse(&msg.result),
                stdout: bounded_capture(&msg.stdout, msg.stdout_total),
                stderr: bounded_capture(&msg.stderr, msg.stderr_total),
                started,
                finished: Instant::now(),
                cold: msg.served == 0,
                instance_exit: None,
            },
            Ok(Reply::Died(exit)) => CallReport {
                instance_exit: Some(exit),
                ..CallReport::failed(
                    GrainError::new(
                        ErrorKind::Crashed,
                        format!("the instance {exit} before answering"),
                    ),
                    started,
                )
            },
            Ok(Reply::Failed(error)) => CallReport::failed(error, started),
            Err(_) => {
                let error = lock(&self.state).dead().cloned().unwrap_or_else(|| {
                    GrainError::new(ErrorKind::Crashed, "the zygote dropped the call")
                });
                CallReport::failed(error, started)
            }
        }
    }

    /// Hands the call in `slot` to an instance: a held spare, the spare on its way, or the
    /// zygote, which forks one for it. A spare found dead before the call's frame is written
    /// whole to it never had the call, which then tries the next way. An error: the zygote's
    /// channel failed.
    async fn hand_over(&self, slot: u32, body: &[u8]) -> io::Result<()> {
        let mut frame = None;
        for tried in 0.. {
            let spare = match self.route(slot, tried < SPARES_TRIED_MAX) {
                Route::Held(held) => held,
                Route::Coming(mut take) => {
                    let given = match tokio::time::timeout(SPARE_WAIT_MAX, &mut take).await {
                        // Dropped: this life ended.
                        Ok(given) => given.ok(),
                        Err(_) => self.unclaim(slot, &mut take),
                    };
                    match given {
                        Some(held) => held,
                        // The zygote is slow, or does not answer `WANT`.
                        None => break,
                    }
                }
                Route::Zygote => break,
                Route::Settled => return Ok(()),
            };
            if self.begin_write(slot) {
                let frame = frame.get_or_insert_with(|| private_frame(slot, body));
                let written = write_frame(&spare.sock.0, frame).await;
                if self.end_write(slot, written.is_ok()) {
                    return Ok(());
                }
            }
            tracing::debug!(
                instance = spare.number,
                "a spare was dead before a call reached it; the call goes on elsewhere"
            );
        }
        self.send(Kind::Call, slot, body).await
    }

    /// The next way to an instance for the call in `slot`; with `spares` false, the zygote.
    fn route(&self, slot: u32, spares: bool) -> Route<Arc<Line>, oneshot::Receiver<Held>> {
        lock(&self.state).route(slot, spares, oneshot::channel)
    }

    /// The write of the call's frame to its spare begins; false if the spare was reported
    /// dead before (it never had the call).
    fn begin_write(&self, slot: u32) -> bool {
        lock(&self.state).begin_write(slot)
    }

    /// The write of the call's frame ended. Written whole, the call has started: its instance
    /// serves it (and if its end was reported during the write, the call crashed). Returns
    /// false when the write failed: the instance never had the call.
    fn end_write(&self, slot: u32, written: bool) -> bool {
        let written = lock(&self.state).end_write(slot, written);
        match written {
            Written::Settled | Written::Started => true,
            // The instance's socket closes with its last copy, after the lock.
            Written::Crashed(exit, _held) => {
                self.deliver(slot, Reply::Died(exit));
                true
            }
            // Its socket closes with the last copy of `held`: a live instance exits.
            Written::Failed(_held) => false,
        }
    }

    /// Gives up waiting for the spare on its way (the zygote is slow, or does not answer
    /// `WANT`); returns it if it was given meanwhile.
    fn unclaim(&self, slot: u32, take: &mut oneshot::Receiver<Held>) -> Option<Held> {
        if lock(&self.state).unclaim(slot) {
            return None;
        }
        // The spare is given under the lock (`Spare::Give`): if the claim is gone, it is in
        // the channel.
        take.try_recv().ok()
    }

    /// Forgets a call nobody waits for any more; returns the number of the instance serving
    /// it, which the caller kills. Its socket is closed here (an instance that answered anyway
    /// then exits). A call not yet handed over has its instance killed when its `SPARE` comes.
    fn abandon(&self, slot: u32) -> Option<u32> {
        let abandoned = lock(&self.state).abandon(slot);
        abandoned.held.map(|held| held.number)
    }

    async fn send(&self, kind: Kind, slot: u32, body: &[u8]) -> io::Result<()> {
        for piece in pieces(kind, slot, body) {
            self.chan.send(&piece).await?;
        }
        Ok(())
    }

    /// Asks the zygote for spares until `spares` are held or on their way. Called once a
    /// call's result is out, or an instance is gone, never while a call is handed over: the
    /// zygote's fork takes a core for a millisecond and would compete with the call.
    async fn keep_spare(&self) {
        let ask = lock(&self.state).ask_spares();
        for _ in 0..ask {
            if self.send(Kind::Want, 0, &[]).await.is_err() {
                lock(&self.state).spare_not_asked();
            }
        }
    }

    fn deliver(&self, slot: u32, reply: Reply) {
        if let Some(tx) = lock(&self.state).settle(slot) {
            let _ = tx.send(reply);
        }
    }

    /// Ends this life: fails every call in flight with `error`, closes the instances'
    /// sockets, kills the process group.
    fn shut_down(&self, error: GrainError) {
        // The instances' sockets close when `remains` is dropped, at the end.
        let remains = lock(&self.state).shut_down(error.clone());
        for tx in remains.waiters {
            let _ = tx.send(Reply::Failed(error.clone()));
        }
        if let Some(reader) = lock(&self.reader).take() {
            reader.abort();
        }
        if let Err(e) = self.process.kill() {
            tracing::warn!(error = %e, "cannot kill a zygote");
        }
    }

    async fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.shut_down(GrainError::new(
            ErrorKind::Unavailable,
            "the zygote was stopped",
        ));
        if tokio::time::timeout(Duration::from_secs(5), self.process.wait())
            .await
            .is_err()
        {
            tracing::warn!(pid = self.pid, "a killed zygote did not end within 5 s");
        }
    }

    /// A `SPARE` came: hold the instance idle, or serving the call it was handed with, and
    /// read its results. The instance of a call given up meanwhile is killed.
    async fn on_spare(self: &Arc<Self>, slot: u32, number: u32, sock: OwnedFd) {
        let sock = std::os::unix::net::UnixStream::from(sock);
        let sock = match sock
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(sock))
        {
            Ok(sock) => Arc::new(sock),
            Err(e) => {
                tracing::warn!(error = %e, "cannot use an instance's socket");
                let _ = self
                    .send(Kind::Kill, slot, &KillMsg { instance: number }.encode())
                    .await;
                return;
            }
        };
        let line = Arc::new(Line(sock.clone()));
        let unwanted = {
            let mut state = lock(&self.state);
            match state.on_spare(slot, number, line) {
                Spare::Kept => None,
                // Given under the lock: `unclaim` counts on a spare whose claim is gone being
                // in the channel already. Refused only if the call is being dropped: its drop
                // kills the instance, now that it is handed the slot.
                Spare::Give(give, held) => {
                    let _ = give.send(held);
                    None
                }
                Spare::Unwanted(sock) => Some(sock),
            }
        };
        // Its socket closes once the kill is sent.
        if let Some(_line) = unwanted {
            let _ = self
                .send(Kind::Kill, slot, &KillMsg { instance: number }.encode())
                .await;
            return;
        }
        // Read only once the bookkeeping knows what the instance holds.
        tokio::spawn(read_instance(self.clone(), number, sock));
    }

    /// The instance `number` broke the wire (`why`): it is killed, and the call it held fails
    /// with `BadOutput`.
    async fn instance_broke(&self, number: u32, why: String) {
        tracing::warn!(instance = number, %why, "a grain's instance broke the wire");
        self.counters
            .broken_instances
            .fetch_add(1, Ordering::Relaxed);
        let broken = lock(&self.state).broke(number);
        let slot = match broken.call {
            Some((slot, waiter)) => {
                let error = GrainError::new(
                    ErrorKind::BadOutput,
                    format!("the instance broke the wire: {why}"),
                );
                let _ = waiter.send(Reply::Failed(error));
                slot
            }
            None => 0,
        };
        // Its socket closes once the kill is sent.
        let _held = broken.held;
        let _ = self
            .send(Kind::Kill, slot, &KillMsg { instance: number }.encode())
            .await;
        self.keep_spare().await;
    }

    /// Whether the instance `number` holds the call in `slot`.
    fn holds(&self, number: u32, slot: u32) -> bool {
        lock(&self.state).holds(number, slot)
    }

    /// A slot's result is out: its instance waits for the next call (`reuse`), or its socket
    /// is closed, and it exits.
    fn finish(&self, slot: u32) {
        let _let_go = lock(&self.state).finish(slot);
    }

    /// An instance ended (`exit`): forgets it, and says what it was (the instances let go
    /// are closed when the answer is dropped).
    fn instance_ended(&self, number: u32, exit: Exit) -> Ended<Arc<Line>> {
        lock(&self.state).instance_ended(number, exit)
    }
}

/// Writes a whole frame to an instance's private socket (non-blocking; waits for room only
/// when a large call fills the socket's buffer).
async fn write_frame(sock: &UnixStream, mut frame: &[u8]) -> io::Result<()> {
    let write = |data: &[u8]| {
        nix::sys::socket::send(sock.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL)
            .map_err(io::Error::from)
    };
    while !frame.is_empty() {
        match write(frame) {
            Ok(n) => frame = &frame[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                sock.writable().await?;
                match sock.try_io(Interest::WRITABLE, || write(frame)) {
                    Ok(n) => frame = &frame[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

enum Hello {
    Closed,
    Failed(ZygoteError),
}

/// Reads the zygote's first message: `READY` (its pid) or `LOAD_FAILED`.
async fn read_hello(chan: &UnixDatagram) -> Result<u32, Hello> {
    let mut buf = vec![0u8; HEADER_BYTES + PIECE_BODY_BYTES_MAX + 1];
    let mut parts = Reassembler::new(HELLO_BYTES_MAX, HELLO_BYTES_MAX);
    loop {
        let got = receive(chan, &mut buf)
            .await
            .map_err(|e| Hello::Failed(ZygoteError::Channel(e)))?;
        if got.len == 0 {
            return Err(Hello::Closed);
        }
        let wire = |e| Hello::Failed(ZygoteError::Wire(e));
        let (header, body) = parse_piece(&buf[..got.len]).map_err(wire)?;
        fds_fit(header.kind, &got).map_err(wire)?;
        let Some(message) = parts.push(header, body).map_err(wire)? else {
            continue;
        };
        return match header.kind {
            Kind::Ready if message.len() == 4 => Ok(u32::from_le_bytes([
                message[0], message[1], message[2], message[3],
            ])),
            Kind::LoadFailed => Err(Hello::Failed(ZygoteError::Load(
                String::from_utf8_lossy(&message).into_owned(),
            ))),
            kind => Err(wire(WireError::Malformed {
                kind,
                why: "expected READY (4 bytes) or LOAD_FAILED first",
            })),
        };
    }
}

/// One datagram from the channel, and the fds that came with it.
async fn receive(chan: &UnixDatagram, buf: &mut [u8]) -> io::Result<Received> {
    chan.async_io(Interest::READABLE, || {
        fd_passing::receive(chan.as_fd(), &mut *buf)
    })
    .await
}

/// Whether a message came with exactly the fds its kind carries. Those that came are closed
/// when `got` is dropped, whatever the answer.
fn fds_fit(kind: Kind, got: &Received) -> Result<(), WireError> {
    if got.fds_truncated {
        Err(WireError::FdsTruncated { kind })
    } else if got.fds.len() != kind.fds() {
        Err(WireError::Fds {
            kind,
            count: got.fds.len(),
        })
    } else {
        Ok(())
    }
}

/// Reads deaths and spares off the channel for as long as the zygote lives. Each is one piece,
/// so nothing is buffered between reads.
async fn read_results(running: Arc<Running>) {
    let mut buf = vec![0u8; HEADER_BYTES + PIECE_BODY_BYTES_MAX + 1];
    let broken = |why: String| {
        GrainError::new(
            ErrorKind::BadOutput,
            format!("the zygote broke the wire: {why}"),
        )
    };
    loop {
        let mut got = match receive(&running.chan, &mut buf).await {
            Ok(Received { len: 0, .. }) => {
                let error = GrainError::new(ErrorKind::Crashed, "the zygote closed its channel");
                return running.shut_down(error);
            }
            Ok(got) => got,
            Err(e) => {
                let error = GrainError::new(
                    ErrorKind::Crashed,
                    format!("the zygote's channel failed: {e}"),
                );
                return running.shut_down(error);
            }
        };
        let (header, body) = match parse_piece(&buf[..got.len]) {
            Ok(piece) => piece,
            Err(e) => return running.shut_down(broken(e.to_string())),
        };
        if let Err(e) = fds_fit(header.kind, &got) {
            return running.shut_down(broken(e.to_string()));
        }
        if !matches!(header.kind, Kind::Spare | Kind::Died) {
            return running.shut_down(broken(format!(
                "a {:?} message from the zygote",
                header.kind
            )));
        }
        if header.more {
            let why = format!("a {:?} is one piece", header.kind);
            return running.shut_down(broken(why));
        }
        if header.kind == Kind::Spare {
            match (SpareMsg::decode(body), got.fds.pop()) {
                (Ok(spare), Some(sock)) => {
                    running.on_spare(header.slot, spare.instance, sock).await;
                }
                (Err(e), _) => return running.shut_down(broken(e.to_string())),
                // `fds_fit` checked that a SPARE came with its fd.
                (Ok(_), None) => {}
            }
            continue;
        }
        let died = match DiedMsg::decode(body) {
            Ok(died) => died,
            Err(e) => return running.shut_down(broken(e.to_string())),
        };
        let exit = match died.end {
            End::Exited(code) => Exit::Exited(code),
            End::Signaled(sig) => Exit::Signaled(sig),
        };
        // Most ends are of instances that owe nothing (their socket was closed): those
        // change nothing, and must not fork a spare while another call is handed over.
        match running.instance_ended(died.instance, exit) {
            Ended::Unheld => continue,
            Ended::Idle(_let_go) => {}
            Ended::Serving(slot, _let_go) => running.deliver(slot, Reply::Died(exit)),
        }
        running.keep_spare().await;
    }
}

/// Reads the results of the instance `number` off its private socket until end-of-file (the
/// worker let the instance go, or it ended). Takes only the result of the call the instance
/// holds, of at most [`RESULT_BYTES_MAX`], checked before its body is read; anything else
/// breaks the wire.
async fn read_instance(running: Arc<Running>, number: u32, sock: Arc<UnixStream>) {
    loop {
        let mut head = [0u8; PRIVATE_HEAD_BYTES];
        if read_exact(&sock, &mut head).await.is_err() {
            return;
        }
        let why = match parse_private_head(head) {
            None => "a frame too short to hold a slot".to_string(),
            Some((_, len)) if len > RESULT_BYTES_MAX => {
                format!("a result of {len} bytes exceeds {RESULT_BYTES_MAX}")
            }
            Some((slot, _)) if !running.holds(number, slot) => {
                format!("a result for slot {slot}, which is not the call it holds")
            }
            Some((slot, len)) => {
                let mut held = HeldBytes {
                    counters: &running.counters,
                    bytes: 0,
                };
                let Ok(body) = read_body(&sock, len, &mut held).await else {
                    return;
                };
                let reply = match ResultMsg::decode(&body) {
                    Ok(result) => Reply::Result(result),
                    Err(e) => Reply::Failed(GrainError::new(ErrorKind::BadOutput, e.to_string())),
                };
                drop(body);
                drop(held);
                // Free the instance first: a caller that has its result can count on it being
                // free for its next call (what `reuse` promises).
                running.finish(slot);
                running.deliver(slot, reply);
                running.keep_spare().await;
                continue;
            }
        };
        return running.instance_broke(number, why).await;
    }
}

/// The next bytes from an instance's socket (0: end-of-file).
async fn read_some(sock: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        sock.readable().await?;
        match sock.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            done => return done,
        }
    }
}

/// Fills `buf` from an instance's socket; an error at end-of-file.
async fn read_exact(sock: &UnixStream, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match read_some(sock, &mut buf[got..]).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(())
}

/// Reads a result's body of `len` bytes as it comes (never more than has come, plus one
/// read's room), counting what it holds in `held`.
async fn read_body(sock: &UnixStream, len: usize, held: &mut HeldBytes<'_>) -> io::Result<Vec<u8>> {
    const STEP: usize = 64 * 1024;
    let mut body = Vec::new();
    while body.len() < len {
        let at = body.len();
        let room = (len - at).min(STEP);
        held.add(room);
        body.resize(at + room, 0);
        let n = read_some(sock, &mut body[at..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        body.truncate(at + n);
        held.sub(room - n);
    }
    Ok(body)
}

/// Notices the zygote's death, fails its calls in flight, and kills what it left behind.
async fn watch_exit(running: Arc<Running>) {
    let exit = running.process.wait().await;
    if running.stopping.load(Ordering::Relaxed) {
        tracing::debug!(pid = running.pid, %exit, "a stopped zygote ended");
    } else {
        tracing::warn!(pid = running.pid, %exit, "a grain's zygote ended");
    }
    running.shut_down(GrainError::new(
        ErrorKind::Crashed,
        format!("the grain's zygote {exit}"),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::launch::HostLauncher;
    use crate::runtime::python::install_python_runtime;
    use sand_protocol::ids::{Attempt, CallId};
    use sand_protocol::local_bus::GrainResult;
    use sand_protocol::wire::Payload;
    use sand_testkit::proc::children;
    use sand_testkit::wait::eventually;

    /// A directory removed when dropped, also when the test fails.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_spare_is_forked_after_the_call_is_released_not_while_it_runs() {
        let dir = Scratch(std::env::temp_dir().join(format!("sand-spare-{}", std::process::id())));
        let app = dir.0.join("app");
        std::fs::create_dir_all(&app).expect("mkdir");
        let grains = "import os, time\ndef handle(event, ctx):\n    time.sleep(event)\n    return os.getpid()\n";
        std::fs::write(app.join("grains.py"), grains).expect("write grains");
        let script = install_python_runtime(&dir.0.join("runtime")).expect("install");
        let runtime = ZygoteRuntime::Python {
            interpreter: "/usr/bin/python3".into(),
            runtime_script: script,
            module: "grains.py".into(),
            handler: "handle".into(),
        };
        let zygote = Arc::new(
            Zygote::start(Arc::new(HostLauncher), ZygoteSpec::new(runtime, &app))
                .await
                .expect("the zygote starts"),
        );
        let pid = zygote.pid().expect("running");
        assert!(
            eventually(|| children(pid).len() == 1).await,
            "the first spare"
        );
        let spare = children(pid)[0];
        let call = tokio::spawn({
            let zygote = zygote.clone();
            async move {
                zygote
                    .call(CallRequest {
                        exec: String::new(),
                        call: CallId(1),
                        attempt: Attempt(1),
                        input: Payload::from("0.6"),
                        timeout: Some(Duration::from_secs(10)),
                        trace: String::new(),
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            children(pid),
            vec![spare],
            "while the call runs, the spare serves it and no other child is forked"
        );
        let report = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the call ends in time")
            .expect("the call task");
        assert_eq!(
            report.result,
            GrainResult::Return(Payload::from(spare.to_string().as_str()))
        );
        assert!(
            eventually(|| {
                let now = children(pid);
                now.len() == 1 && now[0] != spare
            })
            .await,
            "after the release, the used instance exits and a new spare takes its place: {:?}",
            children(pid)
        );
        zygote.stop().await;
    }
}
