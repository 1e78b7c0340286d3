//! The `exec` runtime: any binary in the app directory, started afresh for every call. The
//! naive baseline: no zygote, no pre-initialisation.
//!
//! The process gets the call's input (JSON) on stdin, followed by end-of-file, and the call's
//! identity in the environment as the API spells it: `SAND_EXEC` (the execution's reference),
//! `SAND_CALL` (16 hex digits) and `SAND_ATTEMPT` (decimal), with its place in the trace in
//! `TRACEPARENT` (W3C; unset when not traced). It
//! writes one result document on stdout (see below) and exits with status 0:
//!
//! - `{"return": v}`, `{"next": ["grain", v]}`, `{"fan_out": [["grain", v], ...], "join": "grain"}`;
//! - `{"error": "text"}` for a failure of its own (`Raised`, whatever the exit status).
//!
//! A process killed by a signal, or exiting non-zero without an error document, is `Crashed`;
//! one that exits 0 with anything else on stdout is `BadOutput`. Its stderr is captured
//! (bounded) into the report; its stdout is the result, so the report's `stdout` stays empty.
//!
//! What the worker buffers of a grain's output is bounded per grain, not only per call: the
//! calls in flight share an output budget ([`OUTPUT_BUDGET_BYTES`] by default). A call whose
//! output does not fit is cut: its stderr ends in [`TRUNCATED_MARK`](super::TRUNCATED_MARK),
//! its stdout fails the call with `BadOutput`; [`ExecGrain::output_dropped_bytes`] counts the
//! bytes dropped.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use nix::fcntl::OFlag;
use nix::unistd::pipe2;
use sand_protocol::local_bus::GrainResult;
use sand_protocol::wire::{ErrorKind, GrainError, MESSAGE_BYTES_MAX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::launch::{Exit, Launcher, ProcessSpec, StdioFds};
use super::{bounded_capture, output, CallReport, CallRequest, CAPTURE_BYTES_MAX};
use std::sync::Arc;

/// How to run an `exec` grain.
#[derive(Clone, Debug)]
pub struct ExecSpec {
    /// The binary, as the launched process sees it.
    pub program: PathBuf,
    /// The app directory (the working directory).
    pub app_dir: PathBuf,
    /// The environment, to which the call's identity is added.
    pub env: Vec<(OsString, OsString)>,
    /// How many calls may run at once; more wait in line.
    pub concurrency: usize,
}

/// The bytes of output (stdout and stderr) the calls of one `exec` grain may hold at once, by
/// default: room for four calls of the largest result.
pub const OUTPUT_BUDGET_BYTES: usize = 4 * (MESSAGE_BYTES_MAX + CAPTURE_BYTES_MAX);

/// An `exec` grain: a fresh process per call, through a [`Launcher`].
pub struct ExecGrain {
    launcher: Arc<dyn Launcher>,
    spec: ExecSpec,
    line: Semaphore,
    /// The output budget: one permit per byte the grain's calls may hold.
    output: Semaphore,
    output_budget: usize,
    /// Bytes of output dropped because the budget was spent.
    dropped: AtomicU64,
}

impl ExecGrain {
    /// An `exec` grain with the default output budget; nothing starts until a call.
    pub fn new(launcher: Arc<dyn Launcher>, spec: ExecSpec) -> Self {
        Self::with_output_budget(launcher, spec, OUTPUT_BUDGET_BYTES)
    }

    /// An `exec` grain whose calls hold at most `budget` bytes of output at once.
    pub fn with_output_budget(launcher: Arc<dyn Launcher>, spec: ExecSpec, budget: usize) -> Self {
        Self {
            launcher,
            line: Semaphore::new(spec.concurrency.max(1)),
            spec,
            output: Semaphore::new(budget),
            output_budget: budget,
            dropped: AtomicU64::new(0),
        }
    }

    /// Bytes of output dropped so far because the grain's calls held their whole budget.
    pub fn output_dropped_bytes(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Runs one call in a new process. Never panics; every failure is a `GrainResult::Error`.
    pub async fn call(&self, request: CallRequest) -> CallReport {
        let Ok(_place) = self.line.acquire().await else {
            let error = GrainError::new(ErrorKind::Unavailable, "the grain was stopped");
            return CallReport::failed(error, Instant::now());
        };
        let started = Instant::now();
        match self.run(request, started).await {
            Ok(report) => report,
            Err(e) => {
                let error = GrainError::new(
                    ErrorKind::Unavailable,
                    format!("cannot start {}: {e}", self.spec.program.display()),
                );
                CallReport::failed(error, started)
            }
        }
    }

    async fn run(&self, request: CallRequest, started: Instant) -> io::Result<CallReport> {
        let (stdin_child, stdin_ours) = pipe_pair()?;
        let (stdout_ours, stdout_child) = pipe_pair()?;
        let (stderr_ours, stderr_child) = pipe_pair()?;
        let mut env = self.spec.env.clone();
        env.push(("SAND_EXEC".into(), request.exec.into()));
        env.push(("SAND_CALL".into(), request.call.to_string().into()));
        env.push(("SAND_ATTEMPT".into(), request.attempt.0.to_string().into()));
        if !request.trace.is_empty() {
            env.push(("TRACEPARENT".into(), request.trace.into()));
        }
        let process = self
            .launcher
            .spawn(ProcessSpec {
                program: self.spec.program.clone(),
                args: Vec::new(),
                env,
                cwd: self.spec.app_dir.clone(),
                channel: None,
                stdio: Some(StdioFds {
                    stdin: stdin_child,
                    stdout: stdout_child,
                    stderr: stderr_child,
                }),
            })
            .await?;
        let mut stdin = pipe::Sender::from_owned_fd(stdin_ours)?;
        let stdout = pipe::Receiver::from_owned_fd(stdout_ours)?;
        let stderr = pipe::Receiver::from_owned_fd(stderr_ours)?;
        let input = request.input.0.clone();
        let work = async {
            let feed = async move {
                // A grain may exit without reading its input: a broken pipe is its business.
                let _ = stdin.write_all(&input).await;
            };
            let (_, out, err) = tokio::join!(
                feed,
                self.read_head(stdout, MESSAGE_BYTES_MAX),
                self.read_head(stderr, CAPTURE_BYTES_MAX)
            );
            (out, err, process.wait().await)
        };
        let (out, err, exit) = match request.timeout {
            None => work.await,
            Some(limit) => match tokio::time::timeout(limit, work).await {
                Ok(done) => done,
                Err(_) => {
                    let _ = process.kill();
                    let error = GrainError::new(
                        ErrorKind::Timeout,
                        format!("ran past {} ms", limit.as_millis()),
                    );
                    return Ok(CallReport::failed(error, started));
                }
            },
        };
        let out = out?;
        let err = err?;
        if out.cut || err.cut {
            tracing::warn!(
                program = %self.spec.program.display(),
                budget = self.output_budget,
                "an exec call's output was cut: the grain's calls hold their whole output budget"
            );
        }
        let mut instance_exit = None;
        let result = match exit {
            _ if out.total > MESSAGE_BYTES_MAX as u64 => GrainResult::Error(GrainError::new(
                ErrorKind::BadOutput,
                format!(
                    "the grain wrote {} bytes on stdout, above {MESSAGE_BYTES_MAX}",
                    out.total
                ),
            )),
            _ if out.cut => GrainResult::Error(GrainError::new(
                ErrorKind::BadOutput,
                format!(
                    "the result was cut: the grain's calls in flight hold more than {} bytes of \
                     output at once (fewer calls at once, or smaller results, fit)",
                    self.output_budget
                ),
            )),
            Exit::Exited(0) => output::parse(&out.head),
            Exit::Exited(_) => match output::parse(&out.head) {
                raised @ GrainResult::Error(GrainError {
                    kind: ErrorKind::Raised,
                    ..
                }) => raised,
                _ => {
                    instance_exit = Some(exit);
                    GrainResult::Error(GrainError::new(
                        ErrorKind::Crashed,
                        format!("the grain {exit}"),
                    ))
                }
            },
            Exit::Signaled(_) | Exit::Gone => {
                instance_exit = Some(exit);
                GrainResult::Error(GrainError::new(
                    ErrorKind::Crashed,
                    format!("the grain {exit}"),
                ))
            }
        };
        Ok(CallReport {
            result,
            stdout: Bytes::new(),
            stderr: bounded_capture(&err.head, err.total),
            started,
            finished: Instant::now(),
            // Every call is a process of its own.
            cold: true,
            instance_exit,
        })
    }
}

/// A pipe as (read end, write end), both close-on-exec.
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// What a call wrote on one pipe, as the worker keeps it.
struct Head<'a> {
    /// The first bytes, at most the pipe's limit.
    head: Vec<u8>,
    /// How many bytes came in all.
    total: u64,
    /// Whether bytes under the limit were dropped because the budget was spent.
    cut: bool,
    /// The budget `head` holds, given back when the call's report is made.
    held: Option<SemaphorePermit<'a>>,
}

impl ExecGrain {
    /// Reads to end-of-file, keeping the first `limit` bytes for as long as the grain's output
    /// budget has room; from the first byte it has none for, keeps nothing more.
    async fn read_head(&self, mut from: pipe::Receiver, limit: usize) -> io::Result<Head<'_>> {
        let mut kept = Head {
            head: Vec::new(),
            total: 0,
            cut: false,
            held: None,
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                let dropped = kept.total.min(limit as u64) - kept.head.len() as u64;
                self.dropped.fetch_add(dropped, Ordering::Relaxed);
                return Ok(kept);
            }
            kept.total += n as u64;
            let keep = n.min(limit.saturating_sub(kept.head.len()));
            if keep == 0 || kept.cut {
                continue;
            }
            // A chunk is at most 64 KiB: it fits a u32 count of permits.
            match self.output.try_acquire_many(keep as u32) {
                Ok(permit) => {
                    match &mut kept.held {
                        Some(held) => held.merge(permit),
                        None => kept.held = Some(permit),
                    }
                    kept.head.extend_from_slice(&buf[..keep]);
                }
                Err(_) => kept.cut = true,
            }
        }
    }
}
