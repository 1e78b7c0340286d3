//! What survives a power cut on a real mount, written through the kernel with std's file API.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::time::Instant;

use common::{
    is_mounted, mount, names, open_rw, read, sync_dir, write_synced, write_unsynced, Watchdog,
};
use nix::fcntl::{Flock, FlockArg};
use sand_lazyfs::{Cut, LazyFs, Stats};

/// The errno of a call that must fail.
fn errno<T: std::fmt::Debug>(result: std::io::Result<T>) -> i32 {
    let error = result.expect_err("the call should fail");
    error.raw_os_error().expect("an OS error")
}

#[test]
fn an_unsynced_write_is_lost_on_cut() {
    let m = mount();
    let path = m.path("f");
    write_synced(&path, b"");
    write_unsynced(&path, b"hello");
    assert_eq!(read(&path).as_deref(), Some(&b"hello"[..]));

    let cut = m.fs.cut_power();

    assert_eq!(read(&path).as_deref(), Some(&b""[..]));
    assert_eq!(
        cut,
        Cut {
            bytes_lost: 5,
            files_reverted: 1,
            entries_lost: 0,
            inodes_lost: 0
        }
    );
}

#[test]
fn an_fsynced_write_survives_a_cut() {
    let m = mount();
    let path = m.path("f");
    write_synced(&path, b"hello");

    assert_eq!(m.fs.cut_power(), Cut::default());
    assert_eq!(read(&path).as_deref(), Some(&b"hello"[..]));
    assert_eq!(
        m.fs.cut_power(),
        Cut::default(),
        "a second cut loses nothing"
    );
    assert_eq!(read(&path).as_deref(), Some(&b"hello"[..]));
}

#[test]
fn a_write_after_the_fsync_is_lost_and_the_earlier_data_kept() {
    let m = mount();
    let path = m.path("f");
    write_synced(&path, b"hello world");
    let file = open_rw(&path);
    file.write_all_at(b"WORLD, and more", 6).expect("write");
    assert_eq!(read(&path).as_deref(), Some(&b"hello WORLD, and more"[..]));

    let cut = m.fs.cut_power();

    assert_eq!(read(&path).as_deref(), Some(&b"hello world"[..]));
    assert_eq!((cut.bytes_lost, cut.files_reverted), (15, 1));
}

#[test]
fn temp_file_fsync_rename_and_directory_fsync_survives() {
    let m = mount();
    let (state, temp) = (m.path("state"), m.path("state.tmp"));
    write_synced(&state, b"v1");
    sync_dir(m.fs.mountpoint());
    write_synced(&temp, b"v2");
    fs::rename(&temp, &state).expect("rename");
    sync_dir(m.fs.mountpoint());

    assert_eq!(m.fs.cut_power(), Cut::default());
    assert_eq!(read(&state).as_deref(), Some(&b"v2"[..]));
    assert_eq!(read(&temp), None);
    assert_eq!(names(m.fs.mountpoint()), ["state"]);
}

#[test]
fn a_rename_without_directory_fsync_reverts_to_the_old_file() {
    let m = mount();
    let (state, temp) = (m.path("state"), m.path("state.tmp"));
    write_synced(&state, b"v1");
    sync_dir(m.fs.mountpoint());
    write_synced(&temp, b"v2");
    fs::rename(&temp, &state).expect("rename");
    assert_eq!(read(&state).as_deref(), Some(&b"v2"[..]));

    let cut = m.fs.cut_power();

    assert_eq!(read(&state).as_deref(), Some(&b"v1"[..]));
    // The temp file's own fsync made its first name durable (it had none), as on ext4.
    assert_eq!(read(&temp).as_deref(), Some(&b"v2"[..]));
    assert_eq!((cut.entries_lost, cut.inodes_lost), (2, 0));
}

#[test]
fn a_new_file_never_fsynced_disappears_entirely() {
    let m = mount();
    let path = m.path("new");
    write_unsynced(&path, b"never synced");
    sync_dir(m.fs.mountpoint());
    write_unsynced(&m.path("newer"), b"neither");

    let cut = m.fs.cut_power();

    // "new" had its name synced by the directory fsync, but not its data.
    assert_eq!(read(&path).as_deref(), Some(&b""[..]));
    assert_eq!(read(&m.path("newer")), None);
    assert_eq!(names(m.fs.mountpoint()), ["new"]);
    assert_eq!(
        cut,
        Cut {
            bytes_lost: 12 + 7,
            files_reverted: 1,
            entries_lost: 1,
            inodes_lost: 1
        }
    );
}

#[test]
fn fsync_of_a_new_file_makes_its_name_durable() {
    let m = mount();
    let path = m.path("new");
    write_synced(&path, b"data");

    assert_eq!(m.fs.cut_power(), Cut::default());
    assert_eq!(read(&path).as_deref(), Some(&b"data"[..]));
}

#[test]
fn truncate_changes_only_the_live_file_until_fsync() {
    let m = mount();
    let path = m.path("f");
    let original: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    write_synced(&path, &original);

    // Shrink, unsynced: the whole file comes back.
    open_rw(&path).set_len(100).expect("truncate");
    assert_eq!(read(&path).map(|d| d.len()), Some(100));
    m.fs.cut_power();
    assert_eq!(read(&path).as_deref(), Some(&original[..]));

    // Shrink then grow, unsynced: the old bytes come back, not the zeros.
    let file = open_rw(&path);
    file.set_len(100).expect("truncate");
    file.set_len(10_000).expect("extend");
    assert_eq!(read(&path).expect("file")[100..], [0; 9_900]);
    m.fs.cut_power();
    assert_eq!(read(&path).as_deref(), Some(&original[..]));

    // O_TRUNC, unsynced: undone too.
    File::create(&path).expect("open with O_TRUNC");
    assert_eq!(read(&path).map(|d| d.len()), Some(0));
    m.fs.cut_power();
    assert_eq!(read(&path).as_deref(), Some(&original[..]));

    // Shrink and fsync: durable.
    let file = open_rw(&path);
    file.set_len(100).expect("truncate");
    file.sync_all().expect("fsync");
    m.fs.cut_power();
    assert_eq!(read(&path).as_deref(), Some(&original[..100]));

    // Extend, unsynced: the length goes back; extend and fsync: zeros past the old end.
    let file = open_rw(&path);
    file.set_len(5_000).expect("extend");
    m.fs.cut_power();
    assert_eq!(read(&path).as_deref(), Some(&original[..100]));
    let file = open_rw(&path);
    file.set_len(5_000).expect("extend");
    file.sync_data().expect("fdatasync");
    m.fs.cut_power();
    let mut expected = original[..100].to_vec();
    expected.resize(5_000, 0);
    assert_eq!(read(&path), Some(expected));
}

#[test]
fn an_unlink_is_undone_unless_the_directory_is_fsynced() {
    let m = mount();
    let (a, b) = (m.path("a"), m.path("b"));
    write_synced(&a, b"A");
    write_synced(&b, b"B");

    fs::remove_file(&a).expect("unlink a");
    let cut = m.fs.cut_power();
    assert_eq!(read(&a).as_deref(), Some(&b"A"[..]));
    assert_eq!(cut.entries_lost, 1);

    fs::remove_file(&a).expect("unlink a");
    fs::remove_file(&b).expect("unlink b");
    sync_dir(m.fs.mountpoint());
    assert_eq!(m.fs.cut_power(), Cut::default());
    assert_eq!(names(m.fs.mountpoint()), Vec::<String>::new());
}

#[test]
fn a_new_directory_is_durable_only_after_its_parent_is_fsynced() {
    let m = mount();
    let (dir, file) = (m.path("d"), m.path("d/f"));
    fs::create_dir(&dir).expect("mkdir");
    write_synced(&file, b"inside");
    sync_dir(&dir);

    let cut = m.fs.cut_power();
    assert_eq!(read(&file), None);
    assert!(!dir.exists());
    assert_eq!(cut.inodes_lost, 2);

    fs::create_dir(&dir).expect("mkdir");
    sync_dir(m.fs.mountpoint());
    write_synced(&file, b"inside");
    assert_eq!(m.fs.cut_power(), Cut::default());
    assert_eq!(read(&file).as_deref(), Some(&b"inside"[..]));
}

#[test]
fn a_rename_across_directories_needs_both_directories_fsynced() {
    let m = mount();
    for dir in ["a", "b"] {
        fs::create_dir(m.path(dir)).expect("mkdir");
    }
    sync_dir(m.fs.mountpoint());
    write_synced(&m.path("a/x"), b"x");

    // Only the target directory synced: the file moves durably.
    fs::rename(m.path("a/x"), m.path("b/y")).expect("rename");
    sync_dir(&m.path("b"));
    m.fs.cut_power();
    assert_eq!(
        (names(&m.path("a")), names(&m.path("b"))),
        (vec![], vec!["y".to_owned()])
    );

    // Only the source directory synced: the file has no durable name left and is lost.
    fs::rename(m.path("b/y"), m.path("a/x")).expect("rename");
    sync_dir(&m.path("b"));
    let cut = m.fs.cut_power();
    assert_eq!((names(&m.path("a")), names(&m.path("b"))), (vec![], vec![]));
    assert_eq!(cut.inodes_lost, 1);
}

#[test]
fn a_handle_open_across_a_cut_gets_eio() {
    let m = mount();
    let path = m.path("f");
    write_synced(&path, b"abc");
    let mut file = open_rw(&path);
    let mut buffer = [0; 3];
    file.read_exact(&mut buffer).expect("read before the cut");
    let mut dir = fs::read_dir(m.fs.mountpoint()).expect("opendir");

    m.fs.cut_power();

    let eio = libc::EIO;
    assert_eq!(errno(file.read_at(&mut buffer, 0)), eio);
    assert_eq!(errno(file.write_at(b"x", 0)), eio);
    assert_eq!(errno(file.sync_all()), eio);
    assert_eq!(errno(file.set_len(0)), eio);
    assert_eq!(errno(dir.next().expect("an entry")), eio);
    drop(file);
    drop(dir);
    assert_eq!(
        read(&path).as_deref(),
        Some(&b"abc"[..]),
        "a new open works"
    );
}

#[test]
fn flock_is_kept_by_the_kernel() {
    let m = mount();
    let path = m.path("lock");
    write_synced(&path, b"");
    let first = Flock::lock(open_rw(&path), FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| errno)
        .expect("first lock");
    let second = Flock::lock(open_rw(&path), FlockArg::LockExclusiveNonblock);
    assert_eq!(
        second.map(|_| ()).map_err(|(_, e)| e),
        Err(nix::errno::Errno::EWOULDBLOCK)
    );
    drop(first);
    assert!(Flock::lock(open_rw(&path), FlockArg::LockExclusiveNonblock).is_ok());
}

#[test]
fn unsupported_operations_fail_with_an_errno_and_the_mount_goes_on() {
    let m = mount();
    let path = m.path("f");
    write_synced(&path, b"data");

    let symlink = std::os::unix::fs::symlink(&path, m.path("link"));
    assert_eq!(errno(symlink), libc::EPERM);
    assert_eq!(errno(fs::hard_link(&path, m.path("hard"))), libc::EPERM);
    let fifo = nix::unistd::mkfifo(&m.path("fifo"), nix::sys::stat::Mode::S_IRWXU);
    assert_eq!(fifo, Err(nix::errno::Errno::EPERM));
    write_synced(&m.path("g"), b"other");
    let exchange = nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &path,
        nix::fcntl::AT_FDCWD,
        &m.path("g"),
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    );
    assert_eq!(exchange, Err(nix::errno::Errno::EINVAL));

    let mut file = OpenOptions::new().append(true).open(&path).expect("open");
    file.write_all(b" and more").expect("write");
    assert_eq!(read(&path).as_deref(), Some(&b"data and more"[..]));
    assert_eq!(names(m.fs.mountpoint()), ["f", "g"]);
}

#[test]
fn stats_count_syncs_writes_and_cuts() {
    let m = mount();
    let path = m.path("f");
    write_synced(&path, &[1; 10_000]);
    sync_dir(m.fs.mountpoint());
    m.fs.cut_power();

    assert_eq!(
        m.fs.stats(),
        Stats {
            fsyncs: 1,
            fsyncdirs: 1,
            bytes_written: 10_000,
            pages_synced: 3,
            cuts: 1
        }
    );
}

#[test]
fn drop_unmounts_and_leaves_an_empty_directory() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let fs = LazyFs::mount(dir.path()).expect("mount lazyfs (needs root and /dev/fuse)");
    let _watchdog = Watchdog::arm(fs.kill_switch(), std::time::Duration::from_secs(60));
    let mountpoint = fs.mountpoint().to_owned();
    write_synced(&mountpoint.join("f"), b"data");
    fs::create_dir(mountpoint.join("d")).expect("mkdir");
    assert!(is_mounted(&mountpoint));

    drop(fs);

    assert!(!is_mounted(&mountpoint));
    assert_eq!(names(&mountpoint), Vec::<String>::new());
}

#[test]
fn drop_with_a_file_still_open_does_not_hang() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let fs = LazyFs::mount(dir.path()).expect("mount lazyfs (needs root and /dev/fuse)");
    let _watchdog = Watchdog::arm(fs.kill_switch(), std::time::Duration::from_secs(60));
    let mountpoint = fs.mountpoint().to_owned();
    write_synced(&mountpoint.join("f"), b"data");
    let held = File::open(mountpoint.join("f")).expect("open");

    let start = Instant::now();
    drop(fs);
    println!("drop with a busy mount took {:?}", start.elapsed());

    assert!(!is_mounted(&mountpoint));
    assert_eq!(names(&mountpoint), Vec::<String>::new());
    let mut buffer = [0; 4];
    let error = held
        .read_at(&mut buffer, 0)
        .expect_err("the connection is gone");
    assert_eq!(error.raw_os_error(), Some(libc::ENOTCONN), "{error}");
    assert_eq!(error.kind(), ErrorKind::NotConnected);
}

#[test]
fn a_pulled_kill_switch_ends_the_mount_while_a_file_is_open() {
    let m = mount();
    let mountpoint = m.fs.mountpoint().to_owned();
    write_synced(&mountpoint.join("f"), b"data");
    let held = File::open(mountpoint.join("f")).expect("open");

    // From another thread, as the watchdog pulls it.
    let switch = m.fs.kill_switch();
    std::thread::spawn(move || switch.pull())
        .join()
        .expect("pull");

    assert!(!is_mounted(&mountpoint));
    let mut buffer = [0; 4];
    let error = held
        .read_at(&mut buffer, 0)
        .expect_err("the connection is gone");
    assert_eq!(error.raw_os_error(), Some(libc::ENOTCONN), "{error}");
}
