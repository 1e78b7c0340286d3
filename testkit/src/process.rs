//! Child processes of a test: a short command that must succeed, the first line a daemon
//! prints, a signal and a bounded wait for the end, and a child killed when dropped.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Runs `program args` to the end; returns its stdout, or an error with its stderr unless it
/// succeeded.
pub fn run(program: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first line `output` gives (empty if it closes first), waiting `within` at most.
///
/// The reader is a thread of its own, which ends when the line comes or `output` closes (its
/// writer exits, or is killed when it takes too long).
pub fn first_line(output: impl Read + Send + 'static, within: Duration) -> Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(output).read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
    });
    rx.recv_timeout(within)
        .map_err(|_| anyhow!("no line within {within:?}"))?
        .context("cannot read the line")
}

/// Sends `signal` to `child` and waits for it to end, `within` at most.
pub fn stop(child: &mut Child, signal: Signal, within: Duration) -> Result<ExitStatus> {
    nix::sys::signal::kill(pid(child.id()), signal)
        .with_context(|| format!("cannot send {signal} to {}", child.id()))?;
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().context("cannot poll the child")? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!(
                "{signal} did not stop process {} within {within:?}",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `pid` as nix takes it.
pub fn pid(pid: u32) -> Pid {
    Pid::from_raw(pid as i32)
}

/// A child process, SIGKILLed and reaped when dropped (also when a test fails).
#[derive(Debug)]
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
