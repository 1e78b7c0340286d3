//! A FUSE filesystem that forgets every write not yet made durable when a test cuts its
//! power, the way [LazyFS] does, for Jepsen-style crash tests: a process writes through a real
//! mount, the test kills it, calls [`LazyFs::cut_power`], and restarts it on what survived.
//!
//! [LazyFS]: https://github.com/dsrhaslab/lazyfs
//!
//! # Model
//!
//! An in-memory filesystem of directories and regular files with two states: **live**, what
//! processes see, and **durable**, what survives a power cut. The rules:
//!
//! - `write`, `truncate`/`ftruncate` (a `setattr` of the size) and `fallocate` (mode 0
//!   extends; `FALLOC_FL_KEEP_SIZE` is accepted and changes nothing; other modes are
//!   `EOPNOTSUPP`) change the live file only.
//! - `fsync`/`fdatasync` on a file: the file's live data and length become its durable data
//!   and length. If the file has no durable name yet (it was created, or renamed, since the
//!   parent directory was last synced), the fsync also makes its current name durable in its
//!   parent directory — what ext4 and xfs do in practice, since their journal commits the
//!   creating transaction with the fsync; POSIX does not promise it.
//! - `fsync` on a directory (`FSYNCDIR`): the directory's durable entries become exactly its
//!   live entries — creates, unlinks and renames into or out of it. Inodes keep their own
//!   durable data, which for a file never fsynced is empty. An inode has one durable name:
//!   a durable entry that names it in one directory removes its durable entry in another (a
//!   rename's durable half is a move). So a rename across directories needs both directories
//!   synced; after only the source's fsync the file has no durable name, and a cut loses it.
//!   That is stricter than ext4, whose journal commits both halves together.
//! - `mkdir`: the new directory's name becomes durable only by a fsync of its parent, as for
//!   any other entry; fsyncing a file inside it does not make the directory itself durable.
//! - [`LazyFs::cut_power`]: live := durable everywhere. Files and directories that no chain of
//!   durable names links to the root are gone. Every handle open at the cut is dead: any
//!   later operation on it fails with `EIO` (`close` still releases it, and reports `EIO`).
//!
//! Owner, permissions and times are not modelled: they change at once and a cut keeps them.
//! Not supported, with the error a filesystem without them gives: symbolic and hard links
//! (`EPERM`), FIFOs, sockets and devices (`EPERM`), extended attributes (`EOPNOTSUPP`),
//! `RENAME_EXCHANGE` and `RENAME_WHITEOUT` (`EINVAL`), and shared writable `mmap` (files are
//! opened with direct I/O). File locks (`flock`, `fcntl`) are kept by the kernel, which does so
//! for every FUSE filesystem that does not implement them.
//!
//! What it does not model: a cut loses whole operations since the last sync, never part of
//! one. There are no torn writes (a write, or a 4 KiB page of it, is never half there), no
//! reordering (everything synced before the cut survives; nothing written after a sync
//! survives without the next one), no data reaching the disk early (an unsynced write never
//! survives, though on a real disk it may), and no corruption of synced data.
//!
//! # Kernel caching
//!
//! Every file is opened with `FOPEN_DIRECT_IO` (no page cache) and every entry and attribute
//! is returned with a TTL of zero, so after a cut a process reads exactly the durable state.
//!
//! # Cost
//!
//! File data is held in 4 KiB copy-on-write pages (`Arc`s shared by the live and durable
//! versions) with a set of dirty pages: a write costs the pages it touches, a fsync the pages
//! written since the previous fsync, never the size of the file. A cut costs one pass over
//! all inodes and page tables.
//!
//! # Mounting
//!
//! The process must be root (it calls `mount(2)` itself; no `fusermount` is needed) and have
//! `/dev/fuse`. One thread serves the mount. [`LazyFs`]'s `Drop` detaches the mount even if it
//! is busy, so a failing test leaves no mount behind.

mod mount;
mod pages;
mod server;
mod state;

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, Session, SessionACL};

use crate::server::Server;
use crate::state::{Creator, State};

/// How long `Drop` waits for the session thread after detaching the mount before it aborts
/// the connection (it only waits that long if a process still holds a file open on it).
const DETACH_GRACE: Duration = Duration::from_millis(500);

/// How long `Drop` waits for the session thread after aborting the connection.
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// A mounted lazy filesystem, served on a background thread. Dropping it unmounts it.
#[derive(Debug)]
pub struct LazyFs {
    mountpoint: PathBuf,
    state: Arc<Mutex<State>>,
    /// `None` once `Drop` has taken it.
    session: Option<BackgroundSession>,
    /// The connection's name in `fusectl`, to abort it if the mount is busy at `Drop`.
    connection: Option<u64>,
}

/// What a power cut threw away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    /// Bytes written since their file's last fsync, over all files (overwrites count each
    /// time they were written).
    pub bytes_lost: u64,
    /// Surviving files whose data or length went back to an older version.
    pub files_reverted: u64,
    /// Directory entries of surviving directories that changed since the directory's last
    /// fsync (a create, unlink or rename not made durable; a rename counts in each
    /// directory).
    pub entries_lost: u64,
    /// Files and directories gone entirely: no chain of durable names reached them.
    pub inodes_lost: u64,
}

/// Counters since the mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// `fsync` and `fdatasync` calls on files.
    pub fsyncs: u64,
    /// `fsync` calls on directories.
    pub fsyncdirs: u64,
    /// Bytes written by `write`.
    pub bytes_written: u64,
    /// Pages copied into the durable state by file fsyncs: the cost of syncing.
    pub pages_synced: u64,
    /// Power cuts.
    pub cuts: u64,
}

impl LazyFs {
    /// Mounts an empty filesystem at `mountpoint`, an existing empty directory, and serves it
    /// on a background thread. The root directory takes the owner and permissions of
    /// `mountpoint`. Needs root and `/dev/fuse`.
    pub fn mount(mountpoint: &Path) -> io::Result<LazyFs> {
        let mountpoint = mountpoint.canonicalize()?;
        let metadata = fs::metadata(&mountpoint)?;
        if !metadata.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("mountpoint {} is not a directory", mountpoint.display()),
            ));
        }
        if fs::read_dir(&mountpoint)?.next().is_some() {
            return Err(io::Error::new(
                io::ErrorKind::DirectoryNotEmpty,
                format!(
                    "mountpoint {} is not empty; mount on an empty directory",
                    mountpoint.display()
                ),
            ));
        }
        let state = Arc::new(Mutex::new(State::new(Creator {
            uid: metadata.uid(),
            gid: metadata.gid(),
            perm: metadata.mode(),
        })));
        let device = mount::mount_fuse(&mountpoint, metadata.mode())?;
        // From here on the kernel has a mount: `Drop` takes it down if anything fails.
        let mut lazy = LazyFs {
            mountpoint,
            state: state.clone(),
            session: None,
            connection: None,
        };
        let mut config = Config::default();
        config.acl = SessionACL::All;
        let session = Session::from_fd(
            Server::new(state),
            OwnedFd::from(device),
            SessionACL::All,
            config,
        )?;
        lazy.session = Some(session.spawn()?);
        // Asks the session thread for the root's attributes: it must be serving by now.
        lazy.connection = Some(mount::connection(&lazy.mountpoint)?);
        Ok(lazy)
    }

    /// Cuts the power: every write not yet made durable is forgotten (see the crate doc), and
    /// every handle open now fails with `EIO` from here on. Kill the processes that use the
    /// filesystem first: a process still running sees its files change under it.
    pub fn cut_power(&self) -> Cut {
        self.state().cut()
    }

    /// Counters since the mount.
    pub fn stats(&self) -> Stats {
        self.state().stats()
    }

    /// A handle that ends this mount from any thread, for a watchdog that must stop a test
    /// which overran its time: see [`KillSwitch::pull`].
    pub fn kill_switch(&self) -> KillSwitch {
        KillSwitch {
            mountpoint: self.mountpoint.clone(),
            connection: self.connection,
        }
    }

    /// Where the filesystem is mounted (canonical path).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The session thread never leaves the state half-updated (no operation panics midway
        // by design), so a poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Ends a mount from another thread: see [`LazyFs::kill_switch`].
#[derive(Clone, Debug)]
pub struct KillSwitch {
    mountpoint: PathBuf,
    connection: Option<u64>,
}

impl KillSwitch {
    /// Detaches the mount and aborts its connection, so that every pending and later request
    /// on it fails. A process that serves its own mount must pull it before it exits while a
    /// thread may still use the mount: exiting closes that thread's files on it, and the
    /// kernel would wait for a reply the dead session thread can never send.
    pub fn pull(&self) {
        if let Err(error) = mount::detach(&self.mountpoint) {
            tracing::warn!(mountpoint = %self.mountpoint.display(), %error, "lazyfs: unmount failed");
        }
        if let Some(connection) = self.connection {
            if let Err(error) = mount::abort(connection) {
                tracing::warn!(connection, %error, "lazyfs: aborting the FUSE connection failed");
            }
        }
    }
}

impl Drop for LazyFs {
    /// Detaches the mount (even a busy one), ends the connection if a process still holds a
    /// file open on it, and joins the session thread. Never blocks for long: if the thread
    /// still does not end, it is left behind, detached, with a warning.
    fn drop(&mut self) {
        if let Err(error) = mount::detach(&self.mountpoint) {
            tracing::warn!(mountpoint = %self.mountpoint.display(), %error, "lazyfs: unmount failed");
        }
        let Some(session) = self.session.take() else {
            return;
        };
        if !wait_for(&session.guard, DETACH_GRACE) {
            // Busy: a process holds a file open on the detached mount. End the connection so
            // its calls fail instead of the session thread waiting for it.
            if let Some(connection) = self.connection {
                if let Err(error) = mount::abort(connection) {
                    tracing::warn!(connection, %error, "lazyfs: aborting the FUSE connection failed");
                }
            }
            if !wait_for(&session.guard, ABORT_GRACE) {
                tracing::warn!(mountpoint = %self.mountpoint.display(), "lazyfs: session thread still running; leaving it");
                return;
            }
        }
        // The thread's own result only says how the connection ended (ENODEV on a clean
        // unmount, ECONNABORTED after an abort); both are expected here.
        if let Err(error) = session.join() {
            tracing::debug!(%error, "lazyfs: session ended");
        }
    }
}

/// Waits up to `limit` for `thread` to finish; returns whether it did.
fn wait_for<T>(thread: &JoinHandle<T>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(1));
    }
    true
}

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "power cut lost {} unsynced bytes, reverted {} files, lost {} directory entries \
             and {} files or directories",
            self.bytes_lost, self.files_reverted, self.entries_lost, self.inodes_lost
        )
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} fsyncs ({} pages synced), {} directory fsyncs, {} bytes written, {} cuts",
            self.fsyncs, self.pages_synced, self.fsyncdirs, self.bytes_written, self.cuts
        )
    }
}

#[cfg(test)]
mod tests {
    /// A crash test cuts the power from whichever thread drives it.
    #[test]
    fn lazyfs_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<super::LazyFs>();
    }
}
