//! The `exec` runtime: any binary in the app directory, started afresh for every call. The
//! naive baseline: no zygote, no pre-initialisation.
//!
//! The process gets the call's input (JSON) on stdin, followed by end-of-file, and the call's
//! identity in the environment as `SAND_EXEC`, `SAND_CALL` and `SAND_ATTEMPT` (decimal). It
//! writes one result document on stdout (see below) and exits with status 0:
//!
//! - `{"return": v}`, `{"next": ["grain", v]}`, `{"fan_out": [["grain", v], ...], "join": "grain"}`;
//! - `{"error": "text"}` for a failure of its own (`Raised`, whatever the exit status).
//!
//! A process killed by a signal, or exiting non-zero without an error document, is `Crashed`;
//! one that exits 0 with anything else on stdout is `BadOutput`. Its stderr is captured
//! (bounded) into the report; its stdout is the result, so the report's `stdout` stays empty.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use nix::fcntl::OFlag;
use nix::unistd::pipe2;
use sand_protocol::local_bus::GrainResult;
use sand_protocol::wire::{ErrorKind, GrainError, MESSAGE_BYTES_MAX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Semaphore;

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

/// An `exec` grain: a fresh process per call, through a [`Launcher`].
pub struct ExecGrain {
    launcher: Arc<dyn Launcher>,
    spec: ExecSpec,
    line: Semaphore,
}

impl ExecGrain {
    /// An `exec` grain; nothing starts until a call.
    pub fn new(launcher: Arc<dyn Launcher>, spec: ExecSpec) -> Self {
        Self {
            launcher,
            line: Semaphore::new(spec.concurrency.max(1)),
            spec,
        }
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
        env.push(("SAND_EXEC".into(), request.exec.0.to_string().into()));
        env.push(("SAND_CALL".into(), request.call.0.to_string().into()));
        env.push(("SAND_ATTEMPT".into(), request.attempt.0.to_string().into()));
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
                read_head(stdout, MESSAGE_BYTES_MAX),
                read_head(stderr, CAPTURE_BYTES_MAX)
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
        let (out, out_total) = out?;
        let (err, err_total) = err?;
        let mut instance_exit = None;
        let result = match exit {
            _ if out_total > MESSAGE_BYTES_MAX as u64 => GrainResult::Error(GrainError::new(
                ErrorKind::BadOutput,
                format!("the grain wrote {out_total} bytes on stdout, above {MESSAGE_BYTES_MAX}"),
            )),
            Exit::Exited(0) => output::parse(&out),
            Exit::Exited(_) => match output::parse(&out) {
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
            stderr: bounded_capture(&err, err_total),
            started,
            finished: Instant::now(),
            instance_exit,
        })
    }
}

/// A pipe as (read end, write end), both close-on-exec.
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Reads to end-of-file, keeping the first `limit` bytes; returns them and the total.
async fn read_head(mut from: pipe::Receiver, limit: usize) -> io::Result<(Vec<u8>, u64)> {
    let mut head = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok((head, total));
        }
        total += n as u64;
        let room = limit.saturating_sub(head.len());
        head.extend_from_slice(&buf[..n.min(room)]);
    }
}
