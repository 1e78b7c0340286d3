//! A root worker's sandboxed processes run unprivileged: as the configured identity (nobody by
//! default), with no_new_privs and no capability at all, so they cannot remount their root,
//! mount anything or write the bundle. These need root; they fail, not skip, without it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{bundle, config, sh, spec, TEST_TIMEOUT};
use sand_sandbox::{Exit, ReadOnlyPath, RunAs, Sandbox, SandboxError};
use tokio::time::timeout;

fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests check how a root worker drops privileges: run them as root"
    );
}

/// The `/proc/self/status` fields a privilege drop shows in, as `name value` lines.
const STATUS_FIELDS: &str = "grep -E '^(Uid|Gid|Groups|NoNewPrivs|CapInh|CapPrm|CapEff|CapBnd|CapAmb):' /proc/self/status | tr -s '\\t ' ' '";

/// Runs the Python `script` in a new sandbox named `name`, with the test's interpreter
/// reachable, and asserts it exits 0; returns the sandbox, its bundle (alive as long as the
/// sandbox) and the script's output.
async fn run_python(name: &str, script: &str) -> (Sandbox, tempfile::TempDir, String) {
    let python = interpreter();
    let app = bundle(&[("script.py", script)]);
    let mut with_python = config(name, app.path());
    with_python.ro_paths = interpreter_prefix(&python)
        .into_iter()
        .map(ReadOnlyPath::same)
        .collect();
    let sandbox = Sandbox::create(with_python).await.expect("create");
    let command = format!("exec {} /app/script.py", python.display());
    let (exit, out) = sh(&sandbox, &command).await;
    assert_eq!(exit, Exit::Exited(0), "output: {out}");
    (sandbox, app, out)
}

/// The value of `field` in the output of [`STATUS_FIELDS`].
fn status_field<'a>(out: &'a str, field: &str) -> &'a str {
    out.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {field} in {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_run_as_nobody_with_no_privileges() {
    assert_root();
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let sandbox = Sandbox::create(config("nobody", app.path()))
            .await
            .expect("create");
        let (exit, out) = sh(&sandbox, STATUS_FIELDS).await;
        assert_eq!(exit, Exit::Exited(0), "output: {out}");
        assert_eq!(
            status_field(&out, "Uid"),
            "65534 65534 65534 65534",
            "{out}"
        );
        assert_eq!(
            status_field(&out, "Gid"),
            "65534 65534 65534 65534",
            "{out}"
        );
        assert_eq!(
            status_field(&out, "Groups"),
            "",
            "no supplementary group: {out}"
        );
        assert_eq!(status_field(&out, "NoNewPrivs"), "1", "{out}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(&out, set), "0000000000000000", "{set}: {out}");
        }
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_run_as_the_configured_identity() {
    assert_root();
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let mut custom = config("custom-id", app.path());
        custom.run_as = RunAs {
            uid: 4321,
            gid: 4322,
        };
        let sandbox = Sandbox::create(custom).await.expect("create");
        let (exit, out) = sh(&sandbox, STATUS_FIELDS).await;
        assert_eq!(exit, Exit::Exited(0), "output: {out}");
        assert_eq!(status_field(&out, "Uid"), "4321 4321 4321 4321", "{out}");
        assert_eq!(status_field(&out, "Gid"), "4322 4322 4322 4322", "{out}");
        assert_eq!(status_field(&out, "CapEff"), "0000000000000000", "{out}");
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remounting_mounting_and_writing_the_bundle_are_refused() {
    assert_root();
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[("data.txt", "bundle data")]);
        let sandbox = Sandbox::create(config("locked", app.path()))
            .await
            .expect("create");
        let (exit, out) = sh(
            &sandbox,
            "if mount -o remount,rw / 2>/dev/null; then echo remounted-root; else echo remount-refused; fi
             if mount -t tmpfs none /tmp 2>/dev/null; then echo mounted-tmpfs; else echo mount-refused; fi
             if (echo x > /app/new) 2>/dev/null; then echo app-writable; else echo app-not-writable; fi
             if (echo x >> /app/data.txt) 2>/dev/null; then echo bundle-file-writable; else echo bundle-file-not-writable; fi
             echo scratch > /tmp/scratch && echo tmp-writable:$(stat -c %u:%g /tmp/scratch)
             echo shared > /dev/shm/s && echo shm-writable
             if kill -0 1 2>/dev/null; then echo can-signal-pid1; else echo pid1-out-of-reach; fi",
        )
        .await;
        assert_eq!(exit, Exit::Exited(0), "output: {out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "remount-refused",
                "mount-refused",
                "app-not-writable",
                "bundle-file-not-writable",
                "tmp-writable:65534:65534",
                "shm-writable",
                "pid1-out-of-reach",
            ],
            "{out}"
        );
        assert_eq!(
            std::fs::read_to_string(app.path().join("data.txt")).expect("read the bundle file"),
            "bundle data"
        );
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

/// The mount system call itself, not the `mount` tool, fails with EPERM: a process with no
/// capability cannot remount its root read-write or mount a new file system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mount_system_call_fails_with_eperm() {
    assert_root();
    timeout(TEST_TIMEOUT, async {
        let (sandbox, _app, out) = run_python("mount-syscall", MOUNT_PY).await;
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            ["remount: EPERM", "tmpfs: EPERM", "uid 65534"],
            "{out}"
        );
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

const MOUNT_PY: &str = r#"
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
MS_REMOUNT, MS_BIND = 32, 4096
for name, args in [
    ("remount", (None, b"/", None, MS_REMOUNT | MS_BIND, None)),
    ("tmpfs", (b"none", b"/tmp", b"tmpfs", 0, None)),
]:
    if libc.mount(*args) == 0:
        print(name + ": mounted")
    else:
        print(name + ": " + errno.errorcode[ctypes.get_errno()])
print("uid", os.getuid())
"#;

/// The seccomp filter refuses new namespaces (by `unshare`, `setns` or `clone`), tracing, eBPF,
/// performance counters, userfaultfd and the keyring, and answers `clone3` with ENOSYS, while
/// `fork` and threads (which fall back from `clone3` to `clone`) go on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seccomp_filter_refuses_namespaces_and_tracing() {
    assert_root();
    timeout(TEST_TIMEOUT, async {
        let (sandbox, _app, out) = run_python("seccomp", SYSCALLS_PY).await;
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [
                "unshare(CLONE_NEWUSER): EPERM",
                "unshare(CLONE_NEWNET): EPERM",
                "setns: EPERM",
                "clone(CLONE_NEWUSER): EPERM",
                "clone3: ENOSYS",
                "ptrace: EPERM",
                "keyctl: EPERM",
                "bpf: EPERM",
                "perf_event_open: EPERM",
                "userfaultfd: EPERM",
                "x32: EPERM",
                "fork: ok",
                "thread: ok",
            ],
            "{out}"
        );
        let (exit, out) = sh(&sandbox, "unshare --user true 2>&1; echo exit $?").await;
        assert_eq!(exit, Exit::Exited(0), "output: {out}");
        assert!(
            out.contains("Operation not permitted") && !out.ends_with("exit 0\n"),
            "the unshare tool: {out}"
        );
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

/// Makes each call and prints what it returned; a call that created something (a namespace, a
/// child) says so, and such a child exits at once.
const SYSCALLS_PY: &str = r#"
import ctypes, errno, os, platform, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {
    "x86_64": {"clone": 56, "keyctl": 250, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323},
    "aarch64": {"clone": 220, "keyctl": 219, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282},
}[platform.machine()]
CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x40000000, 17

def report(name, ret):
    if ret == -1:
        print(name + ": " + errno.errorcode[ctypes.get_errno()])
    else:
        print(name + ": returned " + str(ret))

report("unshare(CLONE_NEWUSER)", libc.unshare(CLONE_NEWUSER))
report("unshare(CLONE_NEWNET)", libc.unshare(CLONE_NEWNET))
fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
report("setns", libc.setns(fd, 0))
pid = libc.syscall(NR["clone"], CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
if pid == 0:
    os._exit(0)
if pid > 0:
    os.waitpid(pid, 0)
report("clone(CLONE_NEWUSER)", pid)
report("clone3", libc.syscall(435, 0, 0))
report("ptrace", libc.ptrace(0, 0, 0, 0))
report("keyctl", libc.syscall(NR["keyctl"], 0, -2, 1))
report("bpf", libc.syscall(NR["bpf"], 0, 0, 0))
report("perf_event_open", libc.syscall(NR["perf_event_open"], 0, 0, -1, -1, 0))
report("userfaultfd", libc.syscall(NR["userfaultfd"], 0))
if platform.machine() == "x86_64":
    report("x32", libc.syscall(0x40000000 | 39, 0))  # x32 getpid
else:
    print("x32: EPERM")  # an x86_64 ABI only
child = os.fork()
if child == 0:
    os._exit(7)
print("fork: " + ("ok" if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 7 else "failed"))
ran = []
t = threading.Thread(target=lambda: ran.append(1))
t.start()
t.join()
print("thread: " + ("ok" if ran else "failed"))
"#;

/// The filter refuses io_uring, reaching into another process (`pidfd_getfd`, which would copy
/// its descriptors, `process_madvise`, `kcmp`), `modify_ldt`, NUMA placement and unusual
/// personas, while reading the persona still works. The other process is a child of the same
/// user, which the kernel alone would let it reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seccomp_filter_refuses_io_uring_and_reaching_other_processes() {
    assert_root();
    timeout(TEST_TIMEOUT, async {
        let (sandbox, _app, out) = run_python("seccomp-more", MORE_SYSCALLS_PY).await;
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [
                "io_uring_setup: EPERM",
                "io_uring_enter: EPERM",
                "io_uring_register: EPERM",
                "pidfd_getfd: EPERM",
                "process_madvise: EPERM",
                "kcmp: EPERM",
                "modify_ldt: EPERM",
                "mbind: EPERM",
                "set_mempolicy: EPERM",
                "move_pages: EPERM",
                "personality(READ_IMPLIES_EXEC): EPERM",
                "personality(query): ok",
            ],
            "{out}"
        );
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

const MORE_SYSCALLS_PY: &str = r#"
import ctypes, errno, mmap, os, platform
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {
    "x86_64": {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
               "pidfd_getfd": 438, "process_madvise": 440, "kcmp": 312, "modify_ldt": 154,
               "mbind": 237, "set_mempolicy": 238, "move_pages": 279, "personality": 135},
    "aarch64": {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
                "pidfd_getfd": 438, "process_madvise": 440, "kcmp": 272,
                "mbind": 235, "set_mempolicy": 237, "move_pages": 239, "personality": 92},
}[platform.machine()]

def report(name, ret):
    if ret == -1:
        print(name + ": " + errno.errorcode[ctypes.get_errno()])
    else:
        print(name + ": ok")

params = ctypes.create_string_buffer(120)
report("io_uring_setup", libc.syscall(NR["io_uring_setup"], 1, params))
report("io_uring_enter", libc.syscall(NR["io_uring_enter"], 0, 0, 0, 0, 0, 0))
report("io_uring_register", libc.syscall(NR["io_uring_register"], 0, 0, 0, 0))
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(w)
    os.read(r, 1)
    os._exit(0)
pidfd = os.pidfd_open(child)
report("pidfd_getfd", libc.syscall(NR["pidfd_getfd"], pidfd, r, 0))
page = ctypes.create_string_buffer(4096)
iov = (ctypes.c_void_p * 2)(ctypes.addressof(page), 4096)
report("process_madvise", libc.syscall(NR["process_madvise"], pidfd, iov, 1, 20, 0))
KCMP_FILE = 0
report("kcmp", libc.syscall(NR["kcmp"], os.getpid(), child, KCMP_FILE, r, r))
os.close(w)
os.waitpid(child, 0)
if "modify_ldt" in NR:
    ldt = ctypes.create_string_buffer(16)
    report("modify_ldt", libc.syscall(NR["modify_ldt"], 0, ldt, 16))
else:
    print("modify_ldt: EPERM")  # x86 only
mapped = mmap.mmap(-1, 4096)
address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
MPOL_DEFAULT = 0
report("mbind", libc.syscall(NR["mbind"], address, 4096, MPOL_DEFAULT, 0, 0, 0))
report("set_mempolicy", libc.syscall(NR["set_mempolicy"], MPOL_DEFAULT, 0, 0))
pages = (ctypes.c_void_p * 1)(address)
status = (ctypes.c_int * 1)()
report("move_pages", libc.syscall(NR["move_pages"], 0, 1, pages, None, status, 0))
READ_IMPLIES_EXEC = 0x0400000
report("personality(READ_IMPLIES_EXEC)", libc.syscall(NR["personality"], READ_IMPLIES_EXEC))
report("personality(query)", libc.syscall(NR["personality"], 0xffffffff))
"#;

/// `/proc` is masked as container runtimes mask it: the kernel's memory, keys, timers and
/// sysrq read as `/dev/null`, hardware directories are empty, `/proc/sys` and its kin are
/// read-only, and processes of other users (PID 1, which runs as root) are invisible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proc_is_masked_and_hides_other_users_processes() {
    assert_root();
    timeout(TEST_TIMEOUT, async {
        let (sandbox, _app, out) = run_python("proc-masked", PROC_PY).await;
        let seen: serde_json::Value = serde_json::from_str(&out).expect("probe output is JSON");
        let files = seen["files"].as_object().expect("files");
        for name in ["keys", "timer_list"] {
            assert!(files.contains_key(name), "/proc/{name} not probed: {out}");
        }
        for (name, state) in files {
            assert_eq!(state, "null device, 0 bytes", "/proc/{name}: {out}");
        }
        for (name, entries) in seen["dirs"].as_object().expect("dirs") {
            assert_eq!(entries, &serde_json::json!([]), "/proc/{name}: {out}");
        }
        let read_only = seen["read_only"].as_object().expect("read_only");
        assert!(read_only.contains_key("sys"), "{out}");
        for (name, ro) in read_only {
            assert_eq!(ro, true, "/proc/{name} is writable: {out}");
        }
        assert_eq!(
            seen["pid1_visible"], false,
            "PID 1 (root) is visible: {out}"
        );
        assert_eq!(seen["self_visible"], true, "{out}");
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

const PROC_PY: &str = r#"
import json, os, stat
null = os.stat("/dev/null").st_rdev
files = {}
for name in ["kcore", "keys", "timer_list", "timer_stats", "sched_debug", "latency_stats",
             "sysrq-trigger"]:
    path = "/proc/" + name
    if not os.path.exists(path):
        continue
    st = os.stat(path)
    if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == null):
        files[name] = "not masked"
        continue
    with open(path, "rb") as f:
        files[name] = "null device, %d bytes" % len(f.read(4096))
dirs = {name: sorted(os.listdir("/proc/" + name))
        for name in ["acpi", "scsi", "asound"] if os.path.isdir("/proc/" + name)}
read_only = {name: bool(os.statvfs("/proc/" + name).f_flag & os.ST_RDONLY)
             for name in ["sys", "irq", "bus", "fs"] if os.path.isdir("/proc/" + name)}
print(json.dumps({
    "files": files,
    "dirs": dirs,
    "read_only": read_only,
    "pid1_visible": os.path.exists("/proc/1"),
    "self_visible": os.path.exists("/proc/%d" % os.getpid()),
}))
"#;

/// A write to `/tmp` or `/dev/shm` past the default tmpfs size fails with ENOSPC, and the space
/// comes back once the file is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmpfs_writes_past_the_size_fail_with_enospc() {
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let mut sized = config("tmpfs-size", app.path());
        sized.limits.tmpfs_bytes = 8 << 20;
        let sandbox = Sandbox::create(sized).await.expect("create");
        for dir in ["/tmp", "/dev/shm"] {
            let (exit, out) = sh(
                &sandbox,
                &format!(
                    "dd if=/dev/zero of={dir}/big bs=1M count=9 2>&1 | grep -o 'No space left on device' | head -1
                     rm {dir}/big
                     dd if=/dev/zero of={dir}/small bs=1M count=4 2>/dev/null && echo fits"
                ),
            )
            .await;
            assert_eq!(exit, Exit::Exited(0), "{dir}: {out}");
            assert_eq!(out, "No space left on device\nfits\n", "{dir}: {out}");
        }
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

/// An interpreter under `/root/.pyenv` (whose host `/root` is mode 0700) runs as nobody when
/// its prefix is a read-only path, and can fork and watch a child by pidfd, as the Python
/// zygote does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interpreter_under_root_runs_as_nobody() {
    assert_root();
    timeout(TEST_TIMEOUT, async {
        let (sandbox, _app, out) = run_python("pyenv", ZYGOTE_PY).await;
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            ["uid 65534", "child exited 7"],
            "{out}"
        );
        let (exit, out) = sh(&sandbox, "ls -A /root 2>/dev/null || true").await;
        assert_eq!(exit, Exit::Exited(0), "output: {out}");
        assert_eq!(
            out.trim(),
            if interpreter().starts_with("/root/") {
                ".pyenv"
            } else {
                ""
            },
            "only the interpreter's path is visible under /root: {out}"
        );
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

const ZYGOTE_PY: &str = r#"
import os, select
print("uid", os.getuid(), flush=True)
pid = os.fork()
if pid == 0:
    os._exit(7)
fd = os.pidfd_open(pid)
select.select([fd], [], [], 10)
_, status = os.waitpid(pid, 0)
print("child exited", os.waitstatus_to_exitcode(status))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_directory_nobody_cannot_enter_fails_the_spawn() {
    assert_root();
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let private = app.path().join("private");
        std::fs::create_dir(&private).expect("mkdir");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let sandbox = Sandbox::create(config("cwd", app.path()))
            .await
            .expect("create");
        let (_ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let mut denied = spec("/bin/true", &[], theirs);
        denied.cwd = "/app/private".into();
        match sandbox.spawn(denied).await {
            Err(SandboxError::Spawn { reason, .. }) => assert!(
                reason.contains("Permission denied") && reason.contains("uid 65534"),
                "{reason}"
            ),
            other => panic!("the spawn was not refused: {other:?}"),
        }
        let (exit, out) = sh(&sandbox, "echo still serving").await;
        assert_eq!((exit, out.as_str()), (Exit::Exited(0), "still serving\n"));
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_nobody_cannot_read_is_a_clear_setup_error() {
    assert_root();
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[("grains.py", "")]);
        std::fs::set_permissions(app.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        match Sandbox::create(config("unreadable", app.path())).await {
            Err(SandboxError::Setup { reason, .. }) => assert!(
                reason.contains("the app bundle")
                    && reason.contains("mode 700")
                    && reason.contains("uid 65534 gid 65534"),
                "{reason}"
            ),
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(sandbox) => {
                sandbox.destroy().await.expect("destroy");
                panic!("a sandbox was made around a bundle its processes cannot read");
            }
        }
        // Readable by its group, which is the sandbox's: accepted.
        std::os::unix::fs::chown(app.path(), None, Some(65534)).expect("chgrp");
        std::fs::set_permissions(app.path(), std::fs::Permissions::from_mode(0o750))
            .expect("chmod");
        let sandbox = Sandbox::create(config("group-readable", app.path()))
            .await
            .expect("create");
        let (exit, out) = sh(&sandbox, "ls /app").await;
        assert_eq!((exit, out.as_str()), (Exit::Exited(0), "grains.py\n"));
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_identity_is_refused_with_a_clear_error() {
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        for (uid, gid) in [(0, 0), (0, 65534), (65534, 0)] {
            let mut as_root = config("as-root", app.path());
            as_root.run_as = RunAs { uid, gid };
            match Sandbox::create(as_root).await {
                Err(e @ SandboxError::RunAsRoot { .. }) => {
                    let message = e.to_string();
                    assert!(
                        message.contains(&format!("uid {uid} gid {gid}"))
                            && message.contains("not allowed"),
                        "{message}"
                    );
                }
                Err(other) => panic!("{uid}:{gid} refused for another reason: {other}"),
                Ok(sandbox) => {
                    sandbox.destroy().await.expect("destroy");
                    panic!("a sandbox running as {uid}:{gid} was made");
                }
            }
        }
    })
    .await
    .expect("test timed out");
}

/// A Python interpreter for the tests: `SAND_TEST_PYTHON`, else the newest pyenv 3.x under
/// `/root/.pyenv/versions` (outside the system directories, the case that matters), else the
/// system's `/usr/bin/python3`.
fn interpreter() -> PathBuf {
    if let Some(python) = std::env::var_os("SAND_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let mut pyenv: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/root/.pyenv/versions")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version: Vec<u32> = name
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let python = entry.path().join("bin/python3");
            (version >= vec![3, 9] && python.exists()).then_some((version, python))
        })
        .collect();
    pyenv.sort();
    pyenv
        .pop()
        .map_or_else(|| PathBuf::from("/usr/bin/python3"), |(_, python)| python)
}

/// The installation prefix an interpreter outside the system directories needs mounted.
fn interpreter_prefix(python: &Path) -> Option<PathBuf> {
    if python.starts_with("/usr") {
        return None;
    }
    python.parent()?.parent().map(Path::to_path_buf)
}
