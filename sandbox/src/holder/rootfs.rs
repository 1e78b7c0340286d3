//! The sandbox's root file system, built in a fresh tmpfs and entered with `pivot_root`.
//!
//! Layout: the host's system directories read-only (symlinks such as `/bin -> usr/bin` kept as
//! symlinks), the app bundle read-only at `/app`, each extra read-only path where it was asked,
//! a private `/tmp`, a minimal `/dev`, and the `/proc` of the sandbox's pid namespace.
//! The sandbox's processes run unprivileged, so `/tmp` and `/dev/shm` are mode 1777 (each a
//! tmpfs of [`HolderConfig::tmpfs_bytes`]) and the directories made to reach a read-only path
//! are 0755.
//!
//! `/proc` is masked as runc masks it by default: `/dev/null` is bound over the files that
//! show kernel memory, keys, timers and sysrq; an empty read-only tmpfs hides the hardware
//! directories; `/proc/sys`, `/proc/irq`, `/proc/bus` and `/proc/fs` are read-only (in the
//! user-namespace fallback the grain is uid 0 of its own namespace and could otherwise write
//! the sysctls that namespace owns). It is mounted with `hidepid=invisible` (or the older
//! `hidepid=2`) where the kernel accepts it, so a grain sees only its own user's processes.
//!
//! Every host source is opened (`O_PATH`) before anything is mounted and bound through
//! `/proc/self/fd/N`, so building the root in place of `/tmp` cannot hide a source that lives
//! there.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{chdir, chroot, pivot_root};

use super::privileges::Privileges;
use crate::cgroup::unescape_mount_path;
use crate::wire::HolderConfig;

/// Host directories programs need to run: binaries, their ELF interpreter and libraries,
/// configuration. Missing ones are skipped.
const SYSTEM_PATHS: [&str; 8] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc",
];
/// Device nodes bound from the host's /dev.
const DEVICES: [&str; 4] = ["null", "zero", "urandom", "random"];
/// Where the new root is assembled, in this mount namespace only.
const NEW_ROOT: &str = "/tmp";
/// Files in `/proc` replaced by `/dev/null` where they exist (runc's `maskedPaths`).
const PROC_MASKED_FILES: [&str; 7] = [
    "kcore",
    "keys",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "latency_stats",
    "sysrq-trigger",
];
/// Directories in `/proc` covered by an empty read-only tmpfs where they exist.
const PROC_MASKED_DIRS: [&str; 3] = ["acpi", "scsi", "asound"];
/// Directories in `/proc` made read-only (runc's `readonlyPaths`).
const PROC_READ_ONLY: [&str; 4] = ["sys", "irq", "bus", "fs"];
/// `/proc` mount options, tried in order: `hidepid=invisible` (Linux 5.8), `hidepid=2`, none.
const PROC_OPTIONS: [Option<&str>; 3] = [Some("hidepid=invisible"), Some("hidepid=2"), None];

/// A host path to appear in the sandbox, opened before the mounts start.
enum Source {
    Directory(OwnedFd),
    File(OwnedFd),
    Symlink(PathBuf),
}

/// The host objects the sandbox is made of, opened while the host's tree is still in view.
pub(super) struct Sources {
    system: Vec<(PathBuf, Source)>,
    bundle: OwnedFd,
    read_only: Vec<(PathBuf, Source)>,
    devices: Vec<(&'static str, OwnedFd)>,
}

impl Sources {
    /// Opens everything the root will bind, after checking that the sandbox's processes may
    /// read the bundle and the read-only paths.
    pub(super) fn open(config: &HolderConfig, privileges: &Privileges) -> Result<Sources, String> {
        let bundle = Path::new(OsStr::from_bytes(&config.bundle_dir));
        privileges
            .check_reachable(bundle)
            .map_err(|e| format!("the app bundle {e}"))?;
        let mut system = Vec::new();
        for path in SYSTEM_PATHS.map(Path::new) {
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = std::fs::read_link(path)
                        .map_err(|e| format!("reading link {}: {e}", path.display()))?;
                    system.push((path.to_path_buf(), Source::Symlink(target)));
                }
                Ok(meta) if meta.is_dir() => {
                    system.push((path.to_path_buf(), Source::Directory(open_path(path)?)))
                }
                Ok(_) | Err(_) => {}
            }
        }
        let mut read_only = Vec::new();
        for (host, inside) in &config.ro_paths {
            let path = Path::new(OsStr::from_bytes(host));
            privileges
                .check_reachable(path)
                .map_err(|e| format!("the read-only path {e}"))?;
            let fd = open_path(path)?;
            let source = if path.is_dir() {
                Source::Directory(fd)
            } else {
                Source::File(fd)
            };
            read_only.push((PathBuf::from(OsStr::from_bytes(inside)), source));
        }
        let mut devices = Vec::new();
        for name in DEVICES {
            devices.push((name, open_path(&Path::new("/dev").join(name))?));
        }
        Ok(Sources {
            system,
            bundle: open_path(bundle)?,
            read_only,
            devices,
        })
    }
}

/// Builds the root and switches into it. `sources` is consumed: its descriptors must not leak
/// into the sandbox's processes.
pub(super) fn build(config: &HolderConfig, sources: Sources) -> Result<(), String> {
    let root = Path::new(NEW_ROOT);
    mount_fs(
        "tmpfs",
        root,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=755,size=1m",
    )?;
    let mut read_only = Vec::new();
    for (path, source) in &sources.system {
        read_only.extend(place(root, path, source)?);
    }
    let app = root.join("app");
    make_dir(&app)?;
    bind(&sources.bundle, &app)?;
    read_only.push(app);
    // /tmp before the read-only paths: one under /tmp (a test's runtime, say) lands inside it.
    let tmp = root.join("tmp");
    make_dir(&tmp)?;
    mount_fs(
        "tmpfs",
        &tmp,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=1777,size={}", config.tmpfs_bytes),
    )?;
    for (path, source) in &sources.read_only {
        read_only.extend(place(root, path, source)?);
    }
    build_dev(&root.join("dev"), &sources.devices, config.tmpfs_bytes)?;
    let proc = root.join("proc");
    read_only.extend(build_proc(&proc, &sources.devices)?);
    remount_read_only(&read_only)?;
    drop(sources);
    enter(root, &config.name)?;
    let root_flags = MsFlags::MS_REMOUNT
        | MsFlags::MS_BIND
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    mount(None::<&str>, "/", None::<&str>, root_flags, None::<&str>)
        .map_err(|e| format!("making / read-only: {e}"))
}

/// Makes `path` appear under `root`; returns the mount point to make read-only, if any.
fn place(root: &Path, path: &Path, source: &Source) -> Result<Option<PathBuf>, String> {
    let target = root.join(path.strip_prefix("/").unwrap_or(path));
    let exists = std::fs::symlink_metadata(&target).is_ok();
    match source {
        Source::Symlink(link) => {
            if !exists {
                std::os::unix::fs::symlink(link, &target).map_err(|e| {
                    format!("linking {} -> {}: {e}", target.display(), link.display())
                })?;
            }
            return Ok(None);
        }
        Source::Directory(_) if !exists => make_dirs(&target)?,
        Source::File(_) if !exists => {
            if let Some(parent) = target.parent() {
                make_dirs(parent)?;
            }
            std::fs::File::create(&target)
                .map_err(|e| format!("creating mount point {}: {e}", target.display()))?;
        }
        Source::Directory(_) | Source::File(_) => {}
    }
    let (Source::Directory(fd) | Source::File(fd)) = source else {
        return Ok(None);
    };
    bind(fd, &target)?;
    Ok(Some(target))
}

/// Mounts the pid namespace's `/proc` at `proc` and masks it (see the module documentation);
/// returns the mount points to make read-only.
fn build_proc(proc: &Path, devices: &[(&'static str, OwnedFd)]) -> Result<Vec<PathBuf>, String> {
    make_dir(proc)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut mounted = Err(Errno::EINVAL);
    for options in PROC_OPTIONS {
        mounted = mount(Some("proc"), proc, Some("proc"), flags, options);
        // EINVAL: a kernel that does not know this hidepid value; try the next.
        if mounted != Err(Errno::EINVAL) {
            break;
        }
    }
    mounted.map_err(|e| {
        format!("mounting /proc for the new pid namespace: {e} (in a user namespace the host's /proc must be fully visible)")
    })?;
    let null = devices
        .iter()
        .find(|(name, _)| *name == "null")
        .map(|(_, fd)| fd)
        .ok_or("no /dev/null to mask /proc with")?;
    for name in PROC_MASKED_FILES {
        let file = proc.join(name);
        if file.exists() {
            bind(null, &file)?;
        }
    }
    for name in PROC_MASKED_DIRS {
        let dir = proc.join(name);
        if dir.is_dir() {
            mount_fs("tmpfs", &dir, flags | MsFlags::MS_RDONLY, "mode=555")?;
        }
    }
    let mut read_only = Vec::new();
    for name in PROC_READ_ONLY {
        let dir = proc.join(name);
        if dir.is_dir() {
            let fd = open_path(&dir)?;
            bind(&fd, &dir)?;
            read_only.push(dir);
        }
    }
    Ok(read_only)
}

fn build_dev(
    dev: &Path,
    devices: &[(&'static str, OwnedFd)],
    tmpfs_bytes: u64,
) -> Result<(), String> {
    make_dir(dev)?;
    // nodev: a node made here does not work; the bound host nodes are mounts of their own.
    mount_fs(
        "tmpfs",
        dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "mode=755,size=64k",
    )?;
    for (name, fd) in devices {
        let node = dev.join(name);
        std::fs::File::create(&node).map_err(|e| format!("creating {}: {e}", node.display()))?;
        bind(fd, &node)?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))
            .map_err(|e| format!("linking /dev/{link}: {e}"))?;
    }
    let shm = dev.join("shm");
    make_dir(&shm)?;
    mount_fs(
        "tmpfs",
        &shm,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        &format!("mode=1777,size={tmpfs_bytes}"),
    )
}

/// Remounts read-only every mount at or below the given points (recursive binds included).
fn remount_read_only(points: &[PathBuf]) -> Result<(), String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading mountinfo: {e}"))?;
    let mounts = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)));
    for mount_point in mounts.filter(|m| points.iter().any(|p| m.starts_with(p))) {
        let mut flags = MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        // In a user namespace the flags a mount inherited from the host are locked: keep them.
        let current = statvfs(&mount_point)
            .map_err(|e| format!("statvfs {}: {e}", mount_point.display()))?
            .flags();
        for (has, keep) in [
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if current.contains(has) {
                flags |= keep;
            }
        }
        mount(
            None::<&str>,
            &mount_point,
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(|e| format!("making {} read-only: {e}", mount_point.display()))?;
    }
    Ok(())
}

/// Makes `root` the root: `pivot_root`, or `chroot` where pivoting is impossible (a ramfs root).
fn enter(root: &Path, name: &str) -> Result<(), String> {
    chdir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    match pivot_root(".", ".") {
        // The old root is now stacked on ".": detach it, so the host tree is out of reach.
        Ok(()) => umount2(".", MntFlags::MNT_DETACH)
            .map_err(|e| format!("detaching the old root: {e}"))?,
        Err(e) => {
            eprintln!("sand-sandbox-init: sandbox {name:?}: pivot_root failed ({e}); using chroot, which is weaker");
            chroot(".").map_err(|e| format!("chroot: {e}"))?;
        }
    }
    chdir("/").map_err(|e| format!("chdir /: {e}"))
}

fn open_path(path: &Path) -> Result<OwnedFd, String> {
    open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

fn bind(source: &OwnedFd, target: &Path) -> Result<(), String> {
    let via = format!("/proc/self/fd/{}", source.as_raw_fd());
    mount(
        Some(via.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind mount onto {}: {e}", target.display()))
}

fn mount_fs(fstype: &str, target: &Path, flags: MsFlags, data: &str) -> Result<(), String> {
    mount(Some(fstype), target, Some(fstype), flags, Some(data))
        .map_err(|e| format!("mounting {fstype} on {}: {e}", target.display()))
}

/// Creates `dir` and its missing parents, each mode 0755 whatever the umask, so the sandbox's
/// unprivileged processes can pass through them to what is mounted below: an interpreter under
/// `/root/.pyenv` is reachable although the host's `/root` is 0700. Only directories made here,
/// in the sandbox's own tmpfs, are changed; an existing one is never touched.
fn make_dirs(dir: &Path) -> Result<(), String> {
    if dir.exists() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        make_dirs(parent)?;
    }
    std::fs::create_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("making {} mode 0755: {e}", dir.display()))
}

fn make_dir(path: &Path) -> Result<(), String> {
    std::fs::create_dir(path).map_err(|e| format!("creating {}: {e}", path.display()))
}
