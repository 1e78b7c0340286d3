//! Helpers shared by the sandbox integration tests.

#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::unistd::pipe2;
use sand_sandbox::{Exit, Limits, Process, ProcessSpec, RunAs, Sandbox, SandboxConfig, StdioFds};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

/// Upper bound for any one test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The holder binary built from this crate.
pub fn init_program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sand-sandbox-init"))
}

/// A bundle directory holding `files`, readable by every user.
pub fn bundle(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sand-bundle-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write bundle file");
    }
    dir
}

/// A config for app `name` with the default limits, which must be enforced, and no network.
pub fn config(name: &str, bundle: &Path) -> SandboxConfig {
    SandboxConfig {
        name: name.to_owned(),
        bundle_dir: bundle.to_path_buf(),
        ro_paths: Vec::new(),
        limits: Limits::default(),
        allow_unlimited: false,
        network: false,
        init_program: init_program(),
        init_args: Vec::new(),
        run_as: RunAs::default(),
    }
}

/// A spec for `program args`, with `channel` as fd 3 and /dev/null as stdin, stdout and stderr.
pub fn spec(program: &str, args: &[&str], channel: UnixStream) -> ProcessSpec {
    process(program, args, Some(channel), None)
}

fn process(
    program: &str,
    args: &[&str],
    channel: Option<UnixStream>,
    stdio: Option<StdioFds>,
) -> ProcessSpec {
    ProcessSpec {
        program: program.into(),
        args: args.iter().map(OsString::from).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        channel: channel.map(Into::into),
        stdio,
    }
}

/// The test's ends of a process's stdin, stdout and stderr pipes.
pub struct Pipes {
    /// Writes the process's stdin.
    pub stdin: pipe::Sender,
    /// Reads its stdout.
    pub stdout: pipe::Receiver,
    /// Reads its stderr.
    pub stderr: pipe::Receiver,
}

impl Pipes {
    /// Writes `input` and closes stdin; returns everything written on stdout and stderr.
    pub async fn communicate(self, input: &str) -> (String, String) {
        let Pipes {
            mut stdin,
            mut stdout,
            mut stderr,
        } = self;
        let feed = async move {
            tokio::io::AsyncWriteExt::write_all(&mut stdin, input.as_bytes())
                .await
                .expect("write stdin");
        };
        let (mut out, mut err) = (String::new(), String::new());
        let (_, read_out, read_err) = tokio::join!(
            feed,
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        read_out.expect("read stdout");
        read_err.expect("read stderr");
        (out, err)
    }
}

/// A spec for `program args` with pipes as its stdin, stdout and stderr and `channel`, if any,
/// as fd 3; returns it with the test's ends of the pipes.
pub fn piped(program: &str, args: &[&str], channel: Option<UnixStream>) -> (ProcessSpec, Pipes) {
    let (stdio, pipes) = stdio_pipes();
    (process(program, args, channel, Some(stdio)), pipes)
}

/// Pipes for a process's standard streams: its ends and the test's. Every end is close-on-exec.
fn stdio_pipes() -> (StdioFds, Pipes) {
    let pipe = || pipe2(OFlag::O_CLOEXEC).expect("pipe2");
    let ((stdin, to_stdin), (from_stdout, stdout), (from_stderr, stderr)) =
        (pipe(), pipe(), pipe());
    let ours = Pipes {
        stdin: pipe::Sender::from_owned_fd(to_stdin).expect("stdin pipe"),
        stdout: pipe::Receiver::from_owned_fd(from_stdout).expect("stdout pipe"),
        stderr: pipe::Receiver::from_owned_fd(from_stderr).expect("stderr pipe"),
    };
    (
        StdioFds {
            stdin,
            stdout,
            stderr,
        },
        ours,
    )
}

/// Starts `program args` in the sandbox; returns it and a reader of what it writes to fd 3.
pub async fn start(
    sandbox: &Sandbox,
    program: &str,
    args: &[&str],
) -> (Process, tokio::net::UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let process = sandbox
        .spawn(spec(program, args, theirs))
        .await
        .expect("spawn");
    ours.set_nonblocking(true).expect("nonblocking");
    (
        process,
        tokio::net::UnixStream::from_std(ours).expect("tokio socket"),
    )
}

/// Runs `program args` to the end; returns how it exited and what it wrote to fd 3.
pub async fn run(sandbox: &Sandbox, program: &str, args: &[&str]) -> (Exit, String) {
    let (mut process, mut output) = start(sandbox, program, args).await;
    let mut text = String::new();
    output
        .read_to_string(&mut text)
        .await
        .expect("read fd 3 output");
    (process.wait().await, text)
}

/// Runs a shell script whose stdout and stderr go to fd 3.
pub async fn sh(sandbox: &Sandbox, script: &str) -> (Exit, String) {
    let script = format!("exec 1>&3 2>&1\n{script}");
    run(sandbox, "/bin/sh", &["-c", &script]).await
}

/// Host pids in the sandbox's cgroups.
pub fn cgroup_pids(dirs: &[PathBuf]) -> Vec<u32> {
    let mut pids: Vec<u32> = dirs
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}
