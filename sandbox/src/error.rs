//! Errors a sandbox operation returns.

use std::path::PathBuf;

/// What went wrong creating, using or destroying a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The app name cannot name a sandbox.
    #[error("invalid app name {name:?}: use 1 to 48 characters from a-z, 0-9, '-' and '_'")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// The identity the sandbox's processes would run as is root.
    #[error("refusing to run sandboxed processes as uid {uid} gid {gid}: uid 0 and gid 0 are not allowed; use an unprivileged identity such as 65534:65534 (nobody)")]
    RunAsRoot {
        /// The uid given.
        uid: u32,
        /// The gid given.
        gid: u32,
    },
    /// A limit in the config is not a limit (zero).
    #[error("invalid sandbox limit {field}: {reason}")]
    InvalidLimit {
        /// The [`crate::Limits`] field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The sandbox's limits cannot be enforced on this host, and the operator did not allow
    /// unlimited sandboxes ([`crate::SandboxConfig::allow_unlimited`]).
    #[error("sandbox {name:?} not started: cannot enforce its {limits} limits: {reason}. Fix: run the worker as root in a cgroup it may write (with cgroup v2, a leaf cgroup with the memory, pids and cpu controllers delegated, e.g. `systemd-run --scope -p Delegate=yes sand worker ...`), or start it with --allow-unlimited to run sandboxes without these limits")]
    Limits {
        /// The app name.
        name: String,
        /// The limits that cannot be enforced, e.g. `memory, pids, cpu`.
        limits: String,
        /// Why.
        reason: String,
    },
    /// The bundle directory is missing or not a directory.
    #[error("app bundle {path:?} cannot be used: {source}")]
    Bundle {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A read-only path is not absolute, missing, or not allowed.
    #[error("read-only path {path:?} cannot be mounted into the sandbox: {reason}")]
    ReadOnlyPath {
        /// The path given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The holder program could not be started.
    #[error("cannot start the sandbox holder {program:?}: {source}")]
    StartHolder {
        /// The holder program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The sandbox's cgroup could not be set up or removed.
    #[error("cgroup {path:?}: {reason}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The holder could not build the sandbox (namespaces, mounts, root).
    #[error("sandbox {name:?} could not be built: {reason}")]
    Setup {
        /// The app name.
        name: String,
        /// What the holder reported.
        reason: String,
    },
    /// A process could not be started inside the sandbox.
    #[error("cannot start {program:?} in the sandbox: {reason}")]
    Spawn {
        /// The program asked for.
        program: PathBuf,
        /// What the holder reported.
        reason: String,
    },
    /// A kill request failed.
    #[error("cannot kill process {pid} in the sandbox: {reason}")]
    Kill {
        /// The process (a pid of the sandbox's namespace).
        pid: u32,
        /// What the holder reported.
        reason: String,
    },
    /// The holder has exited, so the sandbox and all its processes are gone.
    #[error("the sandbox is gone: its holder exited")]
    Gone,
    /// The control socket failed.
    #[error("sandbox control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The holder sent something that is not the control protocol.
    #[error("sandbox control protocol violated: {0}")]
    Protocol(String),
}
