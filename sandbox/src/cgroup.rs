//! One cgroup per sandbox: finding which cgroup version and controllers this host offers,
//! creating the sandbox's cgroup with its limits, counting OOM kills, and removing it.
//!
//! Sandboxes live under a `sand` directory inside the worker's own cgroup, so whatever limits
//! the worker itself runs under also bound its sandboxes. Only files are written here; no
//! process is started.

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{access, AccessFlags, Pid};

use crate::config::Limits;
use crate::error::SandboxError;

/// Where cgroups are mounted on every Linux host sand supports.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The directory under the worker's cgroup that holds one cgroup per sandbox.
const PARENT_NAME: &str = "sand";
/// CFS period used for CPU limits, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
/// The kernel refuses CFS quotas below 1 ms.
const CPU_QUOTA_US_MIN: u64 = 1_000;

/// A resource controller sand uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// Memory limit and OOM accounting.
    Memory,
    /// Process count limit.
    Pids,
    /// CPU bandwidth limit.
    Cpu,
}

impl Controller {
    pub(crate) const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    /// The controller's name in the kernel's files.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

/// Which cgroup support this host offers sand, for the worker to log at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSupport {
    /// The unified hierarchy (cgroup v2) with at least the memory controller.
    V2 {
        /// The directory that holds the sandboxes' cgroups.
        parent: PathBuf,
        /// Controllers sand can use.
        controllers: Vec<Controller>,
        /// Controllers sand cannot use, with the reason.
        missing: Vec<(Controller, String)>,
    },
    /// Separate cgroup v1 hierarchies, one per controller.
    V1 {
        /// For each usable controller, the directory that holds the sandboxes' cgroups.
        parents: Vec<(Controller, PathBuf)>,
        /// Controllers sand cannot use, with the reason.
        missing: Vec<(Controller, String)>,
    },
    /// No cgroup can be used: sandboxes are refused, unless the operator allowed them to run
    /// without limits ([`crate::SandboxConfig::allow_unlimited`]).
    Unavailable {
        /// Why.
        reason: String,
    },
}

impl CgroupSupport {
    fn missing(&self) -> &[(Controller, String)] {
        match self {
            CgroupSupport::V2 { missing, .. } | CgroupSupport::V1 { missing, .. } => missing,
            CgroupSupport::Unavailable { .. } => &[],
        }
    }
}

impl fmt::Display for CgroupSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupSupport::V2 {
                parent,
                controllers,
                ..
            } => {
                let names: Vec<_> = controllers.iter().map(|c| c.name()).collect();
                write!(f, "cgroup v2 at {}: {}", parent.display(), names.join(", "))?;
            }
            CgroupSupport::V1 { parents, .. } => {
                write!(f, "cgroup v1:")?;
                for (controller, parent) in parents {
                    write!(f, " {} at {};", controller.name(), parent.display())?;
                }
            }
            CgroupSupport::Unavailable { reason } => return write!(f, "no cgroups: {reason}"),
        }
        for (controller, reason) in self.missing() {
            write!(f, " {} unavailable ({reason});", controller.name())?;
        }
        Ok(())
    }
}

/// Detects, once per process, which cgroups sandboxes can use.
pub fn cgroup_support() -> CgroupSupport {
    static SUPPORT: OnceLock<CgroupSupport> = OnceLock::new();
    SUPPORT.get_or_init(detect).clone()
}

fn detect() -> CgroupSupport {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|e| CgroupSupport::Unavailable {
            reason: format!("cannot read {path}: {e}"),
        })
    };
    let (mountinfo, membership) = match (read("/proc/self/mountinfo"), read("/proc/self/cgroup")) {
        (Ok(m), Ok(c)) => (m, c),
        (Err(unavailable), _) | (_, Err(unavailable)) => return unavailable,
    };
    let mounts = parse_mountinfo(&mountinfo);
    let memberships = parse_membership(&membership);
    if let Some(root) = mounts
        .iter()
        .find(|m| m.point == Path::new(CGROUP_ROOT) && m.fstype == "cgroup2")
    {
        return detect_v2(root, &memberships);
    }
    detect_v1(&mounts, &memberships)
}

fn detect_v2(root: &Mount, memberships: &[Membership]) -> CgroupSupport {
    let Some(own) = memberships.iter().find(|m| m.controllers.is_empty()) else {
        return CgroupSupport::Unavailable {
            reason: "/proc/self/cgroup has no cgroup v2 entry".into(),
        };
    };
    let dir = root.point.join(relative_to(&own.path, &root.root));
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let available: Vec<&str> = available.split_whitespace().collect();
    if !available.contains(&"memory") {
        return CgroupSupport::Unavailable {
            reason: format!(
                "the cgroup v2 controllers of {} do not include memory",
                dir.display()
            ),
        };
    }
    if let Err(e) = access(&dir, AccessFlags::W_OK | AccessFlags::X_OK) {
        return CgroupSupport::Unavailable {
            reason: format!("{} is not writable: {e}", dir.display()),
        };
    }
    let (controllers, missing): (Vec<_>, Vec<_>) = Controller::ALL
        .into_iter()
        .partition(|c| available.contains(&c.name()));
    CgroupSupport::V2 {
        parent: dir.join(PARENT_NAME),
        controllers,
        missing: missing
            .into_iter()
            .map(|c| (c, format!("not in {}/cgroup.controllers", dir.display())))
            .collect(),
    }
}

fn detect_v1(mounts: &[Mount], memberships: &[Membership]) -> CgroupSupport {
    let mut parents = Vec::new();
    let mut missing = Vec::new();
    for controller in Controller::ALL {
        let has = |list: &[String]| list.iter().any(|c| c == controller.name());
        let mount = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && has(&m.super_options));
        let member = memberships.iter().find(|m| has(&m.controllers));
        let (mount, member) = match (mount, member) {
            (Some(mount), Some(member)) => (mount, member),
            _ => {
                missing.push((controller, "no cgroup v1 hierarchy mounted".to_owned()));
                continue;
            }
        };
        let dir = mount.point.join(relative_to(&member.path, &mount.root));
        match access(&dir, AccessFlags::W_OK | AccessFlags::X_OK) {
            Ok(()) => parents.push((controller, dir.join(PARENT_NAME))),
            Err(e) => missing.push((
                controller,
                format!("{} is not writable: {e}", dir.display()),
            )),
        }
    }
    if parents.is_empty() {
        let reasons: Vec<_> = missing
            .iter()
            .map(|(c, why)| format!("{}: {why}", c.name()))
            .collect();
        return CgroupSupport::Unavailable {
            reason: reasons.join("; "),
        };
    }
    CgroupSupport::V1 { parents, missing }
}

/// One line of /proc/self/mountinfo, the fields this module reads.
#[derive(Debug)]
struct Mount {
    root: PathBuf,
    point: PathBuf,
    fstype: String,
    super_options: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (front, back) = line.split_once(" - ")?;
            let front: Vec<&str> = front.split(' ').collect();
            let mut back = back.split(' ');
            let fstype = back.next()?.to_owned();
            let _source = back.next()?;
            let super_options = back.next()?.split(',').map(str::to_owned).collect();
            Some(Mount {
                root: PathBuf::from(unescape_mount_path(front.get(3)?)),
                point: PathBuf::from(unescape_mount_path(front.get(4)?)),
                fstype,
                super_options,
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as `\` and three octal digits.
pub(crate) fn unescape_mount_path(escaped: &str) -> String {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of /proc/self/cgroup: `id:controllers:path`.
#[derive(Debug)]
struct Membership {
    /// Empty for the v2 hierarchy.
    controllers: Vec<String>,
    path: PathBuf,
}

fn parse_membership(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let _id = fields.next()?;
            let controllers = fields
                .next()?
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            Some(Membership {
                controllers,
                path: PathBuf::from(fields.next()?),
            })
        })
        .collect()
}

/// The part of `path` below the mount's `root` (cgroup namespaces mount a subtree).
fn relative_to(path: &Path, root: &Path) -> PathBuf {
    let inside = path.strip_prefix(root).unwrap_or(path);
    inside.strip_prefix("/").unwrap_or(inside).to_path_buf()
}

/// A sandbox's cgroup: one directory (v2) or one per controller hierarchy (v1).
#[derive(Debug)]
pub(crate) struct Cgroup {
    /// Each directory with the controllers it carries.
    dirs: Vec<(PathBuf, Vec<Controller>)>,
    unified: bool,
    memory_limit: Option<u64>,
}

/// A made cgroup, and the controllers it lacks, each with the reason (their limits go
/// unenforced).
pub(crate) struct Created {
    pub cgroup: Cgroup,
    pub unenforced: Vec<(Controller, String)>,
}

impl Cgroup {
    /// Creates the sandbox's cgroup for app `name` and writes its limits.
    pub(crate) fn create(
        support: &CgroupSupport,
        name: &str,
        limits: &Limits,
    ) -> Result<Created, SandboxError> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let (layout, unified): (Vec<(PathBuf, Vec<Controller>)>, bool) = match support {
            CgroupSupport::V2 {
                parent,
                controllers,
                ..
            } => (vec![(parent.clone(), controllers.clone())], true),
            CgroupSupport::V1 { parents, .. } => (
                parents.iter().map(|(c, p)| (p.clone(), vec![*c])).collect(),
                false,
            ),
            CgroupSupport::Unavailable { reason } => {
                return Err(SandboxError::Cgroup {
                    path: CGROUP_ROOT.into(),
                    reason: reason.clone(),
                })
            }
        };
        sweep_once(&layout);
        for (parent, controllers) in &layout {
            if unified {
                enable_v2_controllers(parent, controllers)?;
            } else {
                ensure_dir(parent)?;
            }
        }
        let leaf = loop {
            let candidate = format!(
                "{name}-{}-{}",
                std::process::id(),
                SEQUENCE.fetch_add(1, Ordering::Relaxed)
            );
            if layout
                .iter()
                .all(|(parent, _)| !parent.join(&candidate).exists())
            {
                break candidate;
            }
        };
        let mut cgroup = Cgroup {
            dirs: Vec::new(),
            unified,
            memory_limit: None,
        };
        for (parent, controllers) in layout {
            let dir = parent.join(&leaf);
            std::fs::create_dir(&dir).map_err(|e| cgroup_error(&dir, "cannot create", e))?;
            cgroup.dirs.push((dir, controllers));
        }
        if let Err(e) = cgroup.write_limits(limits) {
            // Nothing runs in it yet, so removal is immediate.
            let _ = cgroup.remove(Duration::from_millis(100));
            return Err(e);
        }
        Ok(Created {
            cgroup,
            unenforced: support.missing().to_vec(),
        })
    }

    /// Moves process `pid` (and so everything it starts later) into the cgroup.
    pub(crate) fn add(&self, pid: u32) -> Result<(), SandboxError> {
        for (dir, _) in &self.dirs {
            let procs = dir.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string())
                .map_err(|e| cgroup_error(&procs, "cannot join", e))?;
        }
        Ok(())
    }

    /// The memory limit this cgroup enforces, if any.
    pub(crate) fn memory_limit(&self) -> Option<u64> {
        self.memory_limit
    }

    /// How many processes the kernel's OOM killer has killed in this cgroup.
    pub(crate) fn oom_kills(&self) -> u64 {
        let Some(dir) = self.dir_of(Controller::Memory) else {
            return 0;
        };
        let file = if self.unified {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        text.lines()
            .filter_map(|line| line.strip_prefix("oom_kill "))
            .find_map(|count| count.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Removes the cgroup, killing any process still in it; gives up after `timeout`.
    pub(crate) fn remove(&self, timeout: Duration) -> Result<(), SandboxError> {
        let deadline = Instant::now() + timeout;
        for (dir, _) in &self.dirs {
            loop {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                let mut pids = procs
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                    .peekable();
                if pids.peek().is_none() {
                    match std::fs::remove_dir(dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == ErrorKind::NotFound => break,
                        // A process that just exited can keep the cgroup busy for a moment.
                        Err(e) if Instant::now() >= deadline => {
                            return Err(cgroup_error(dir, "cannot remove", e))
                        }
                        Err(_) => {}
                    }
                } else {
                    for pid in pids {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    if Instant::now() >= deadline {
                        return Err(SandboxError::Cgroup {
                            path: dir.clone(),
                            reason: "processes are still in it after SIGKILL".into(),
                        });
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// The directories of the cgroup, one per hierarchy.
    pub(crate) fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(dir, _)| dir.as_path())
    }

    fn dir_of(&self, controller: Controller) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(_, cs)| cs.contains(&controller))
            .map(|(dir, _)| dir.as_path())
    }

    fn write_limits(&mut self, limits: &Limits) -> Result<(), SandboxError> {
        let bytes = limits.memory_bytes;
        if let Some(dir) = self.dir_of(Controller::Memory) {
            if self.unified {
                write_file(dir, "memory.max", &bytes.to_string())?;
                write_optional(dir, "memory.swap.max", "0")?;
            } else {
                write_file(dir, "memory.limit_in_bytes", &bytes.to_string())?;
                // Without this the hog would be swapped out instead of killed.
                write_optional(dir, "memory.memsw.limit_in_bytes", &bytes.to_string())?;
            }
            self.memory_limit = Some(bytes);
        }
        if let Some(dir) = self.dir_of(Controller::Pids) {
            write_file(dir, "pids.max", &limits.pids_max.to_string())?;
        }
        if let Some(dir) = self.dir_of(Controller::Cpu) {
            let quota = (u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000).max(CPU_QUOTA_US_MIN);
            if self.unified {
                write_file(dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
            } else {
                write_file(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                write_file(dir, "cpu.cfs_quota_us", &quota.to_string())?;
            }
        }
        Ok(())
    }
}

/// Removes, once per process, the empty cgroups that crashed workers left behind.
///
/// A worker that dies cannot remove its sandboxes' cgroups, though the sandboxes themselves
/// end with it (their control socket closes). Leaves are named `<app>-<worker pid>-<n>`; one
/// whose worker is gone is removed when empty. A cgroup with processes is never touched (rmdir
/// refuses it anyway).
fn sweep_once(layout: &[(PathBuf, Vec<Controller>)]) {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        for (parent, _) in layout {
            let Ok(entries) = std::fs::read_dir(parent) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let worker = name.to_str().and_then(|n| n.rsplit('-').nth(1)).and_then(|p| p.parse::<u32>().ok());
                let Some(worker) = worker else { continue };
                let worker_alive = worker == std::process::id() || Path::new(&format!("/proc/{worker}")).exists();
                if !worker_alive && entry.path().is_dir() {
                    match std::fs::remove_dir(entry.path()) {
                        Ok(()) => tracing::info!(cgroup = %entry.path().display(), "removed a crashed worker's cgroup"),
                        Err(e) => tracing::debug!(cgroup = %entry.path().display(), "stale cgroup kept: {e}"),
                    }
                }
            }
        }
    });
}

/// Lets `parent`'s children use `controllers`, creating `parent` inside the worker's cgroup.
fn enable_v2_controllers(parent: &Path, controllers: &[Controller]) -> Result<(), SandboxError> {
    let enable: Vec<String> = controllers
        .iter()
        .map(|c| format!("+{}", c.name()))
        .collect();
    let enable = enable.join(" ");
    if let Some(own) = parent.parent() {
        // Fails with EBUSY when the worker's own cgroup holds processes and is not the root
        // (cgroup v2's no-internal-processes rule): the worker must then run in a leaf cgroup.
        write_file(own, "cgroup.subtree_control", &enable)?;
    }
    ensure_dir(parent)?;
    write_file(parent, "cgroup.subtree_control", &enable)
}

/// Creates the shared `sand` directory unless another sandbox already did.
fn ensure_dir(dir: &Path) -> Result<(), SandboxError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(cgroup_error(dir, "cannot create", e)),
    }
}

fn write_file(dir: &Path, file: &str, value: &str) -> Result<(), SandboxError> {
    let path = dir.join(file);
    std::fs::write(&path, value)
        .map_err(|e| cgroup_error(&path, &format!("cannot write {value:?} to"), e))
}

fn write_optional(dir: &Path, file: &str, value: &str) -> Result<(), SandboxError> {
    if dir.join(file).exists() {
        write_file(dir, file, value)?;
    }
    Ok(())
}

fn cgroup_error(path: &Path, what: &str, e: std::io::Error) -> SandboxError {
    SandboxError::Cgroup {
        path: path.to_path_buf(),
        reason: format!("{what} it: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 /inner /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 27 0:40 / /my\\040dir rw - tmpfs tmpfs rw";

    const MEMBERSHIP: &str = "\
8:pids:/inner/job
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/";

    #[test]
    fn mountinfo_fields_and_escapes_are_parsed() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 8);
        let memory = &mounts[4];
        assert_eq!(memory.point, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(memory.fstype, "cgroup");
        assert_eq!(memory.super_options, vec!["rw", "memory"]);
        assert_eq!(mounts[7].point, Path::new("/my dir"));
        assert_eq!(mounts[5].root, Path::new("/inner"));
    }

    #[test]
    fn v1_hierarchies_resolve_to_the_processes_own_cgroup() {
        let mounts = parse_mountinfo(MOUNTINFO);
        let memberships = parse_membership(MEMBERSHIP);
        let memory = memberships
            .iter()
            .find(|m| m.controllers == ["memory"])
            .expect("memory line");
        assert_eq!(
            Path::new("/sys/fs/cgroup/memory").join(relative_to(&memory.path, &mounts[4].root)),
            Path::new("/sys/fs/cgroup/memory/process_api/abc")
        );
        let pids = memberships
            .iter()
            .find(|m| m.controllers == ["pids"])
            .expect("pids line");
        assert_eq!(relative_to(&pids.path, &mounts[5].root), Path::new("job"));
        assert!(memberships
            .iter()
            .any(|m| m.controllers.is_empty() && m.path == Path::new("/")));
    }
}
