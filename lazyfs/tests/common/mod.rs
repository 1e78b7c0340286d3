//! Shared by the integration tests: a lazy filesystem mounted on a fresh temporary directory,
//! with a watchdog that bounds the test's time, and small file helpers.
//!
//! These tests mount FUSE: they need root and `/dev/fuse`.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use sand_lazyfs::{KillSwitch, LazyFs};
use tempfile::TempDir;

/// How long one test may take before the watchdog ends the test binary.
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// A mounted lazy filesystem. Fields drop in order: the mount first, then the watchdog (so a
/// hanging unmount is still caught), then the directory it was mounted on.
pub struct Mounted {
    pub fs: LazyFs,
    _watchdog: Watchdog,
    _dir: TempDir,
}

impl Mounted {
    /// `name`, relative to the mountpoint.
    pub fn path(&self, name: &str) -> PathBuf {
        self.fs.mountpoint().join(name)
    }
}

/// Mounts a fresh lazy filesystem; panics with the reason if it cannot.
pub fn mount() -> Mounted {
    let dir = tempfile::tempdir().expect("temporary directory");
    let fs = LazyFs::mount(dir.path()).expect("mount lazyfs (needs root and /dev/fuse)");
    let watchdog = Watchdog::arm(fs.kill_switch(), TEST_LIMIT);
    Mounted {
        fs,
        _watchdog: watchdog,
        _dir: dir,
    }
}

/// Ends the test binary if the test is still running after its limit, after detaching the
/// mount and aborting its connection, so that nothing is left mounted and no thread of the
/// exiting binary waits on its own dead filesystem. Dropping it disarms it.
pub struct Watchdog {
    _disarm: mpsc::Sender<()>,
}

impl Watchdog {
    pub fn arm(mount: KillSwitch, limit: Duration) -> Watchdog {
        let (disarm, armed) = mpsc::channel();
        thread::spawn(move || {
            if armed.recv_timeout(limit) == Err(RecvTimeoutError::Timeout) {
                eprintln!("test still running after {limit:?}: ending the mount and exiting");
                mount.pull();
                std::process::exit(1);
            }
        });
        Watchdog { _disarm: disarm }
    }
}

/// Writes `data` as the whole content of `path`, without any fsync.
pub fn write_unsynced(path: &Path, data: &[u8]) {
    fs::write(path, data).expect("write");
}

/// Writes `data` as the whole content of `path` and fsyncs the file (not its directory).
pub fn write_synced(path: &Path, data: &[u8]) {
    let mut file = File::create(path).expect("create");
    file.write_all(data).expect("write");
    file.sync_all().expect("fsync");
}

/// Fsyncs the directory `path`.
pub fn sync_dir(path: &Path) {
    File::open(path)
        .expect("open directory")
        .sync_all()
        .expect("fsync directory");
}

/// The content of `path`, or `None` if it does not exist.
pub fn read(path: &Path) -> Option<Vec<u8>> {
    match fs::read(path) {
        Ok(data) => Some(data),
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(error) => panic!("read {}: {error}", path.display()),
    }
}

/// The sorted names in directory `path`.
pub fn names(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(path)
        .expect("read_dir")
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Opens `path` for reading and writing.
pub fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open")
}

/// Whether `path` is a mountpoint now.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    let path = path.to_string_lossy();
    mounts
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(path.as_ref()))
}
