//! What a sandbox is made of, and the checks a config passes before anything starts.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::SandboxError;
use crate::wire::HolderConfig;

/// Longest app name accepted: it becomes the hostname and part of a cgroup name.
const NAME_LEN_MAX: usize = 48;

/// Everything needed to build one app sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The app name: 1 to 48 characters from `a-z`, `0-9`, `-` and `_`. Becomes the hostname.
    pub name: String,
    /// The app bundle on the host, mounted read-only at `/app`. It must be readable by
    /// [`Self::run_as`] (the sandbox is not made otherwise), and so must the files inside.
    pub bundle_dir: PathBuf,
    /// Host paths mounted read-only inside, e.g. an interpreter under `/root/.pyenv`, or sand's
    /// runtime directory at a fixed path. Each must be readable by [`Self::run_as`]; its host
    /// parents need not be (the directories leading to it inside are made mode 0755 in the
    /// sandbox's own root).
    pub ro_paths: Vec<ReadOnlyPath>,
    /// Resource limits. Every one is enforced, or the sandbox is not made: see
    /// [`Self::allow_unlimited`].
    pub limits: Limits,
    /// Start the sandbox even where its cgroup limits cannot be enforced (no usable cgroup, a
    /// controller missing, the worker not in a leaf cgroup), with a warning once per process.
    /// Off by default: [`crate::Sandbox::create`] then fails with
    /// [`SandboxError::Limits`]. An operator's choice (`sand worker --allow-unlimited`), never
    /// an app's. The tmpfs sizes hold either way.
    pub allow_unlimited: bool,
    /// Share the host's network; when false the sandbox has only `lo`.
    pub network: bool,
    /// The holder program: a binary whose `main` calls [`crate::init_main`].
    pub init_program: PathBuf,
    /// Arguments for `init_program` (e.g. a hidden subcommand).
    pub init_args: Vec<OsString>,
    /// The identity every process started in the sandbox runs as, when the holder runs as
    /// real root: each one drops its supplementary groups, switches to this gid and uid, and
    /// loses every capability (effective, permitted, inheritable, ambient and bounding) before
    /// exec. [`RunAs::NOBODY`] (65534:65534) by default; uid 0 and gid 0 are refused.
    ///
    /// A holder without root (the user-namespace fallback, which maps the worker's own uid to
    /// 0 inside) keeps that mapping and ignores this field; its processes still lose every
    /// capability in their namespace. Every process gets no_new_privs either way, so neither
    /// set-user-ID binaries nor file capabilities can raise it again.
    pub run_as: RunAs,
}

/// A host path mounted read-only into a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOnlyPath {
    /// The path on the host: absolute and existing.
    pub host: PathBuf,
    /// Where it appears inside: absolute, without `..`.
    pub inside: PathBuf,
}

impl ReadOnlyPath {
    /// `path`, inside at the same path as on the host.
    pub fn same(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            inside: path.clone(),
            host: path,
        }
    }
}

/// An unprivileged uid and gid for a sandbox's processes; see [`SandboxConfig::run_as`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    /// The user id (never 0).
    pub uid: u32,
    /// The group id (never 0); also the only group: supplementary groups are dropped.
    pub gid: u32,
}

impl RunAs {
    /// The conventional unprivileged identity, `nobody:nogroup` (65534:65534).
    pub const NOBODY: RunAs = RunAs {
        uid: 65534,
        gid: 65534,
    };
}

impl Default for RunAs {
    /// [`RunAs::NOBODY`].
    fn default() -> Self {
        RunAs::NOBODY
    }
}

/// Resource limits of one sandbox. Every resource has one; [`Limits::default`] gives the
/// defaults below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory (and memory plus swap) limit in bytes, the tmpfs contents included (the kernel
    /// charges them to the cgroup). Default [`Limits::MEMORY_BYTES_DEFAULT`].
    pub memory_bytes: u64,
    /// Most processes and threads alive at once, the holder included. Default
    /// [`Limits::PIDS_MAX_DEFAULT`].
    pub pids_max: u64,
    /// CPU time in thousandths of a CPU (1000 = one full core). Default
    /// [`Limits::CPU_MILLIS_DEFAULT`].
    pub cpu_millis: u32,
    /// The size of each of `/tmp` and `/dev/shm` in bytes; a write past it fails with
    /// `ENOSPC`. Default [`Limits::TMPFS_BYTES_DEFAULT`].
    pub tmpfs_bytes: u64,
}

impl Limits {
    /// 512 MiB of memory.
    pub const MEMORY_BYTES_DEFAULT: u64 = 512 << 20;
    /// 1024 processes and threads.
    pub const PIDS_MAX_DEFAULT: u64 = 1024;
    /// One full core.
    pub const CPU_MILLIS_DEFAULT: u32 = 1000;
    /// 64 MiB for each of `/tmp` and `/dev/shm` (Docker's `/dev/shm` size).
    pub const TMPFS_BYTES_DEFAULT: u64 = 64 << 20;
}

impl Default for Limits {
    /// The defaults named by each field.
    fn default() -> Self {
        Limits {
            memory_bytes: Limits::MEMORY_BYTES_DEFAULT,
            pids_max: Limits::PIDS_MAX_DEFAULT,
            cpu_millis: Limits::CPU_MILLIS_DEFAULT,
            tmpfs_bytes: Limits::TMPFS_BYTES_DEFAULT,
        }
    }
}

/// Checks the config and turns it into what the holder is sent.
pub(crate) fn validate(config: &SandboxConfig) -> Result<HolderConfig, SandboxError> {
    validate_name(&config.name)?;
    validate_run_as(config.run_as)?;
    validate_limits(&config.limits)?;
    let bundle = canonical(&config.bundle_dir).map_err(|source| SandboxError::Bundle {
        path: config.bundle_dir.clone(),
        source,
    })?;
    if !bundle.is_dir() {
        return Err(SandboxError::Bundle {
            path: config.bundle_dir.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let mut ro_paths = Vec::with_capacity(config.ro_paths.len());
    for ReadOnlyPath { host, inside } in &config.ro_paths {
        let invalid = |reason: String| SandboxError::ReadOnlyPath {
            path: host.clone(),
            reason,
        };
        if !host.is_absolute() {
            return Err(invalid("the path must be absolute".into()));
        }
        let resolved = canonical(host).map_err(|e| invalid(e.to_string()))?;
        if resolved == Path::new("/") {
            return Err(invalid(
                "the host's root cannot be mounted into a sandbox".into(),
            ));
        }
        let plain = inside.components().all(|c| c != Component::ParentDir);
        if !inside.is_absolute() || !plain || inside == Path::new("/") {
            return Err(invalid(format!(
                "its place inside, {}, must be an absolute path below / without `..`",
                inside.display()
            )));
        }
        // A host path that is a symlink is mounted where it leads; asked for at its own
        // path, it appears there too.
        let inside = if inside == host { &resolved } else { inside };
        ro_paths.push((
            resolved.as_os_str().as_bytes().to_vec(),
            inside.as_os_str().as_bytes().to_vec(),
        ));
    }
    Ok(HolderConfig {
        name: config.name.clone(),
        bundle_dir: bundle.as_os_str().as_bytes().to_vec(),
        ro_paths,
        network: config.network,
        run_as: config.run_as,
        tmpfs_bytes: config.limits.tmpfs_bytes,
    })
}

/// Refuses a zero limit: to the kernel, a tmpfs of size 0 is unlimited, and zero memory,
/// processes or CPU is a sandbox that cannot run.
fn validate_limits(limits: &Limits) -> Result<(), SandboxError> {
    let zero = [
        ("memory_bytes", limits.memory_bytes == 0),
        ("pids_max", limits.pids_max == 0),
        ("cpu_millis", limits.cpu_millis == 0),
        ("tmpfs_bytes", limits.tmpfs_bytes == 0),
    ];
    match zero.iter().find(|(_, is_zero)| *is_zero) {
        Some((field, _)) => Err(SandboxError::InvalidLimit {
            field,
            reason: "0 is not a limit; every sandbox is bounded".into(),
        }),
        None => Ok(()),
    }
}

/// Refuses root: a grain never runs as uid 0, nor with gid 0 (which owns root's files).
fn validate_run_as(run_as: RunAs) -> Result<(), SandboxError> {
    if run_as.uid == 0 || run_as.gid == 0 {
        return Err(SandboxError::RunAsRoot {
            uid: run_as.uid,
            gid: run_as.gid,
        });
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), SandboxError> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    if name.is_empty() || name.len() > NAME_LEN_MAX || !name.chars().all(allowed) {
        return Err(SandboxError::InvalidName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn canonical(path: &Path) -> std::io::Result<PathBuf> {
    std::fs::canonicalize(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_the_alphabet_are_refused() {
        for bad in ["", "a/b", "App", "../x", "a b", &"x".repeat(49)] {
            assert!(
                matches!(validate_name(bad), Err(SandboxError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
        for good in ["a", "shop-cart_2", &"x".repeat(48)] {
            assert!(validate_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn a_read_only_path_goes_below_the_root_without_dot_dot() {
        let config = |inside: &str| SandboxConfig {
            name: "ro".into(),
            bundle_dir: "/".into(),
            ro_paths: vec![ReadOnlyPath {
                host: "/usr".into(),
                inside: inside.into(),
            }],
            limits: Limits::default(),
            network: false,
            init_program: "/bin/true".into(),
            init_args: Vec::new(),
            run_as: RunAs::default(),
            allow_unlimited: false,
        };
        for bad in ["sand/runtime", "/", "/sand/../proc"] {
            assert!(
                matches!(
                    validate(&config(bad)),
                    Err(SandboxError::ReadOnlyPath { .. })
                ),
                "{bad:?} accepted"
            );
        }
        let holder = validate(&config("/sand/runtime")).expect("a valid config");
        assert_eq!(
            holder.ro_paths,
            vec![(b"/usr".to_vec(), b"/sand/runtime".to_vec())]
        );
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(validate_limits(&Limits::default()).is_ok());
        for zeroed in [
            Limits {
                memory_bytes: 0,
                ..Limits::default()
            },
            Limits {
                pids_max: 0,
                ..Limits::default()
            },
            Limits {
                cpu_millis: 0,
                ..Limits::default()
            },
            Limits {
                tmpfs_bytes: 0,
                ..Limits::default()
            },
        ] {
            assert!(
                matches!(
                    validate_limits(&zeroed),
                    Err(SandboxError::InvalidLimit { .. })
                ),
                "{zeroed:?} accepted"
            );
        }
    }

    #[test]
    fn root_identities_are_refused() {
        for (uid, gid) in [(0, 0), (0, 65534), (65534, 0)] {
            assert!(
                matches!(
                    validate_run_as(RunAs { uid, gid }),
                    Err(SandboxError::RunAsRoot { .. })
                ),
                "{uid}:{gid} accepted"
            );
        }
        assert!(validate_run_as(RunAs::default()).is_ok());
        assert!(validate_run_as(RunAs {
            uid: 1000,
            gid: 100
        })
        .is_ok());
    }
}
