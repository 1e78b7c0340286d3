//! Application sandboxes: Linux namespaces, a private root, and cgroup limits.
//!
//! One sandbox per (app, worker). The worker is a multi-threaded tokio process, so it never
//! sets up namespaces itself: [`Sandbox::create`] spawns a holder program (any binary whose
//! `main` calls [`init_main`]) that unshares mount, ipc, uts, pid (and, unless the app needs
//! it, net) namespaces, builds a read-only root in a tmpfs, and forks once to become PID 1 of
//! the new pid namespace. That PID 1 starts, kills and reaps processes on the worker's request
//! over a control socket, and exits when the socket closes, so no sandbox outlives its worker.
//! The processes it starts never keep root: with no_new_privs, no capability, and (for a root
//! worker) the unprivileged [`RunAs`] identity of [`SandboxConfig::run_as`], nobody by default.
//!
//! Every sandbox is bounded: memory, processes and CPU through one cgroup per sandbox (v2 where
//! the unified hierarchy has the memory controller, v1 otherwise), `/tmp` and `/dev/shm` by
//! their tmpfs size ([`Limits`], with defaults). A sandbox whose cgroup limits cannot be
//! enforced is not made, unless the operator set [`SandboxConfig::allow_unlimited`]; then it
//! starts without them and a warning says so once. Without root the holder uses a user
//! namespace, where no cgroup can be written.

mod cgroup;
mod config;
mod error;
mod holder;
mod sandbox;
mod wire;

pub use cgroup::{cgroup_support, CgroupSupport, Controller};
pub use config::{Limits, ReadOnlyPath, RunAs, SandboxConfig};
pub use error::SandboxError;
pub use holder::init_main;
pub use sandbox::{Exit, Process, ProcessId, ProcessSpec, Sandbox, StdioFds};
