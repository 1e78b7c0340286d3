//! Mounting and unmounting through the kernel directly, as root, without `fusermount`.
//!
//! fuser's own mount path would do the same `mount(2)` but falls back to a `fusermount`
//! binary on any `EPERM` (there is none here, so the error would name the wrong cause), and
//! it unmounts with a plain `umount(2)`, which fails on a busy mount and then leaves its
//! session thread blocked. So we open `/dev/fuse` and mount ourselves, hand the descriptor to
//! `fuser::Session::from_fd`, and on teardown detach the mount (`MNT_DETACH`) and, if a
//! process still holds a file open on it, abort the FUSE connection through `fusectl`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{major, minor};
use nix::unistd::{getgid, getuid};

/// Where `fusectl` is usually mounted; each connection has a directory there.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Opens `/dev/fuse` and mounts it at `mountpoint` with a root directory of mode `root_mode`
/// (type and permission bits). Returns the device, ready for the session's `INIT` handshake.
///
/// Every process may use the mount (`allow_other`); the kernel checks permissions against
/// the modes we report (`default_permissions`).
pub(crate) fn mount_fuse(mountpoint: &Path, root_mode: u32) -> io::Result<File> {
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| annotate(e, "cannot open /dev/fuse (is the fuse module loaded?)"))?;
    let data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},allow_other,default_permissions",
        device.as_raw_fd(),
        root_mode,
        getuid(),
        getgid(),
    );
    mount(
        Some("lazyfs"),
        mountpoint,
        Some("fuse.lazyfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|errno| {
        let what = if errno == nix::errno::Errno::EPERM {
            "mounting FUSE with mount(2) needs root (CAP_SYS_ADMIN)".to_owned()
        } else {
            format!("mount(2) of a FUSE filesystem at {}", mountpoint.display())
        };
        annotate(io::Error::from(errno), &what)
    })?;
    Ok(device)
}

/// The name of the FUSE connection serving the mount at `mountpoint`: the kernel's device
/// number of its superblock, as `fusectl` names it.
pub(crate) fn connection(mountpoint: &Path) -> io::Result<u64> {
    let dev = fs::metadata(mountpoint)?.dev();
    Ok((major(dev) << 20) | minor(dev))
}

/// Detaches the mount at `mountpoint` from the namespace at once, busy or not (`MNT_DETACH`);
/// the kernel ends the connection when the last open file on it is closed.
pub(crate) fn detach(mountpoint: &Path) -> io::Result<()> {
    umount2(mountpoint, MntFlags::MNT_DETACH).map_err(io::Error::from)
}

/// Aborts FUSE connection `connection`: every pending and later request on it fails with
/// `ENOTCONN`, and the session thread's read returns. Uses `fusectl`, mounting a private
/// instance for the moment if the usual one is absent.
pub(crate) fn abort(connection: u64) -> io::Result<()> {
    let usual = Path::new(FUSECTL).join(connection.to_string());
    if usual.exists() {
        return fs::write(usual.join("abort"), "1");
    }
    let dir = private_dir(connection);
    fs::create_dir_all(&dir)?;
    let result = mount(
        Some("fusectl"),
        &dir,
        Some("fusectl"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
    .and_then(|()| {
        let written = fs::write(dir.join(connection.to_string()).join("abort"), "1");
        let unmounted = detach(&dir);
        written.and(unmounted)
    });
    // Best effort: an empty directory in the temp dir is all a failure here leaves.
    let _ = fs::remove_dir(&dir);
    result
}

/// A directory for a private `fusectl` mount, unique to this process and connection.
fn private_dir(connection: u64) -> PathBuf {
    std::env::temp_dir().join(format!("lazyfs-fusectl-{}-{connection}", process::id()))
}

fn annotate(error: io::Error, what: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}
