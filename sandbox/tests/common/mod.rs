//! Helpers shared by the sandbox integration tests.

#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sand_sandbox::{Exit, Limits, Process, ProcessSpec, Sandbox, SandboxConfig};
use tokio::io::AsyncReadExt;

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

/// A config for app `name` with no limits and no network.
pub fn config(name: &str, bundle: &Path) -> SandboxConfig {
    SandboxConfig {
        name: name.to_owned(),
        bundle_dir: bundle.to_path_buf(),
        ro_paths: Vec::new(),
        limits: Limits::default(),
        network: false,
        init_program: init_program(),
        init_args: Vec::new(),
    }
}

/// A spec for `program args`, with `channel` as fd 3 and output to the test's stderr.
pub fn spec(program: &str, args: &[&str], channel: UnixStream) -> ProcessSpec {
    ProcessSpec {
        program: program.into(),
        args: args.iter().map(OsString::from).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        channel: channel.into(),
        inherit_output: true,
    }
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

/// True while a host process with this pid exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
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
