//! The zygote loop of a Rust grain: the same behaviour as the Python runtime.
//!
//! The zygote reads `CALL`s from fd 3 and hands each to an idle instance over the instance's
//! private socket (a `u32` length, the slot, the call body); one instance is kept forked
//! ahead, forked again once the call that took it is released (never while handing a call
//! over), and a call that finds none forks one on the spot. The instance runs the handler with its stdout and stderr captured in memory files,
//! writes its `RESULT` straight to fd 3, and then lingers (blocked on its private socket) until
//! the worker's `RELEASE` makes the zygote close that socket, or hand it the next call
//! (`--reuse N`). An instance that dies before release is reported as `DIED`.

#![allow(unsafe_code)] // fork, taking fd 3, and _exit in forked children.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde_json::Value;

use crate::wire::{
    parse_piece, pieces, CallMsg, DiedMsg, Kind, Reassembler, ResultMsg, CAPTURE_BYTES_MAX,
    CHANNEL_FD, HEADER_BYTES, PIECE_BODY_BYTES_MAX,
};
use crate::{Ctx, Output};

/// The largest message the zygote accepts (a call's input is at most 6 MiB).
const MESSAGE_BYTES_MAX: usize = 16 << 20;

/// How often the zygote looks for exited retired instances while some are left.
const REAP_INTERVAL_MS: u8 = 20;

/// Runs the zygote loop with `handler` as the grain; never returns. Call it first thing in
/// `main`, before any thread starts. Arguments (given by sand): `--reuse N` (calls per
/// instance, default 1) and `--fork-on-demand` (no instance forked ahead; SAND's behaviour,
/// for benchmarks).
///
/// The handler's `Err(text)` is the grain's error (`Raised`); a panic is too.
pub fn serve<F>(handler: F) -> !
where
    F: Fn(Value, &Ctx) -> Result<Output, String>,
{
    let code = match start(&handler) {
        Ok(never) => match never {},
        Err(why) => {
            eprintln!("sand-grain: {why}");
            2
        }
    };
    std::process::exit(code)
}

enum Never {}

fn start(handler: &dyn Fn(Value, &Ctx) -> Result<Output, String>) -> Result<Never, String> {
    let mut reuse = 1u32;
    let mut prefork = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--reuse" => {
                reuse = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n >= 1)
                    .ok_or("--reuse needs a number of at least 1")?;
            }
            "--fork-on-demand" => prefork = false,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    fcntl(channel_fd_borrowed(), FcntlArg::F_GETFD)
        .map_err(|e| format!("fd 3 is not open ({e}): sand starts this binary as a zygote"))?;
    // SAFETY: fd 3 is open (checked above) and is the channel sand passed; nothing else in this
    // process owns it, and from here on only this OwnedFd does.
    let chan = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
    if thread_count() != Some(1) {
        let why = "serve() must run before any thread starts (a zygote forks)";
        send_message(&chan, Kind::LoadFailed, 0, why.as_bytes());
        return Err(why.into());
    }
    send_message(&chan, Kind::Ready, 0, &std::process::id().to_le_bytes());
    let mut zygote = Zygote {
        chan,
        handler,
        reuse: if prefork { reuse } else { 1 },
        prefork,
        idle: Vec::new(),
        instances: HashMap::new(),
        by_slot: HashMap::new(),
        calls: Reassembler::new(MESSAGE_BYTES_MAX),
        retired: Vec::new(),
    };
    zygote.serve()
}

fn channel_fd_borrowed() -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: used only for an F_GETFD probe, which is harmless even on a closed fd.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(CHANNEL_FD) }
}

fn thread_count() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/task").ok()?.count())
}

/// Sends one message; a zygote or instance whose worker is gone has nothing left to do.
fn send_message(chan: &OwnedFd, kind: Kind, slot: u32, body: &[u8]) {
    for piece in pieces(kind, slot, body) {
        loop {
            match send(chan.as_raw_fd(), &piece, MsgFlags::MSG_NOSIGNAL) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(_) => exit_now(0),
            }
        }
    }
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process at once, without running atexit handlers or destructors
    // that a forked copy must not run twice; it is always safe to call.
    unsafe { nix::libc::_exit(code) }
}

struct Instance {
    pid: Pid,
    sock: OwnedFd,
    slot: Option<u32>,
    served: u32,
}

struct Zygote<'h> {
    chan: OwnedFd,
    handler: &'h dyn Fn(Value, &Ctx) -> Result<Output, String>,
    reuse: u32,
    prefork: bool,
    /// Instances waiting for a call, most recently used last.
    idle: Vec<RawFd>,
    /// Every live instance, by its private socket.
    instances: HashMap<RawFd, Instance>,
    /// The instance serving each slot the worker has not released.
    by_slot: HashMap<u32, RawFd>,
    calls: Reassembler,
    /// Instances told to exit, not yet reaped.
    retired: Vec<Pid>,
}

impl Zygote<'_> {
    fn serve(&mut self) -> ! {
        self.keep_spare();
        let mut buf = vec![0u8; HEADER_BYTES + PIECE_BODY_BYTES_MAX + 1];
        loop {
            let socks: Vec<RawFd> = self.instances.keys().copied().collect();
            let (chan_ready, gone) = {
                let mut fds = vec![PollFd::new(self.chan.as_fd(), PollFlags::POLLIN)];
                fds.extend(
                    socks
                        .iter()
                        .map(|fd| PollFd::new(self.instances[fd].sock.as_fd(), PollFlags::POLLIN)),
                );
                // A retired instance exits in its own time and nothing wakes us then: look
                // again shortly, so it does not stay a zombie (holding a pid) until the next
                // message.
                let timeout = if self.retired.is_empty() {
                    PollTimeout::NONE
                } else {
                    PollTimeout::from(REAP_INTERVAL_MS)
                };
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => {
                        eprintln!("sand-grain: poll failed: {e}");
                        self.shut_down();
                    }
                }
                let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                let gone: Vec<RawFd> = fds[1..]
                    .iter()
                    .zip(&socks)
                    .filter(|(f, _)| ready(f))
                    .map(|(_, fd)| *fd)
                    .collect();
                (ready(&fds[0]), gone)
            };
            if chan_ready {
                match nix::sys::socket::recv(self.chan.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(0) => self.shut_down(),
                    Ok(n) => self.on_piece(&buf[..n]),
                    Err(Errno::EINTR | Errno::EAGAIN) => {}
                    Err(_) => self.shut_down(),
                }
            }
            for fd in gone {
                self.instance_gone(fd);
            }
            reap(&mut self.retired);
        }
    }

    fn on_piece(&mut self, piece: &[u8]) {
        // The worker is trusted: a piece it should never send is dropped, not obeyed.
        let Ok((header, body)) = parse_piece(piece) else {
            return;
        };
        match header.kind {
            Kind::Call => {
                if let Ok(Some(message)) = self.calls.push(header, body) {
                    self.dispatch(header.slot, &message);
                }
            }
            Kind::Release => self.release(header.slot),
            Kind::Kill => {
                if let Some(inst) = self
                    .by_slot
                    .get(&header.slot)
                    .and_then(|fd| self.instances.get(fd))
                {
                    let _ = kill(inst.pid, Signal::SIGKILL);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, slot: u32, call: &[u8]) {
        let fd = match self.idle.pop() {
            Some(fd) => fd,
            None => self.fork_instance(),
        };
        let mut frame = Vec::with_capacity(8 + call.len());
        frame.extend_from_slice(&((4 + call.len()) as u32).to_le_bytes());
        frame.extend_from_slice(&slot.to_le_bytes());
        frame.extend_from_slice(call);
        if let Some(inst) = self.instances.get_mut(&fd) {
            inst.slot = Some(slot);
            inst.served += 1;
            // A failed write means it died: its end-of-file reports the call.
            let _ = write_all(&inst.sock, &frame);
        }
        self.by_slot.insert(slot, fd);
    }

    fn release(&mut self, slot: u32) {
        let Some(fd) = self.by_slot.remove(&slot) else {
            return;
        };
        let Some(inst) = self.instances.get_mut(&fd) else {
            return;
        };
        inst.slot = None;
        if inst.served < self.reuse {
            self.idle.push(fd);
        } else {
            // Closing its socket lets it exit in its own time.
            if let Some(inst) = self.instances.remove(&fd) {
                self.retired.push(inst.pid);
            }
        }
        self.keep_spare();
    }

    fn instance_gone(&mut self, fd: RawFd) {
        let Some(inst) = self.instances.remove(&fd) else {
            return;
        };
        self.idle.retain(|f| *f != fd);
        let status = loop {
            match waitpid(inst.pid, None) {
                Err(Errno::EINTR) => continue,
                other => break other,
            }
        };
        if let Some(slot) = inst.slot {
            self.by_slot.remove(&slot);
            let died = match status {
                Ok(WaitStatus::Signaled(_, sig, _)) => DiedMsg::Signaled(sig as i32),
                Ok(WaitStatus::Exited(_, code)) => DiedMsg::Exited(code),
                _ => DiedMsg::Exited(-1),
            };
            send_message(&self.chan, Kind::Died, slot, &died.encode());
        }
        self.keep_spare();
    }

    /// Forks the spare when there is none. Called once a call's result is out (`RELEASE`) or
    /// an instance is gone, never while handing a call over: a fork of the zygote takes a core
    /// for a millisecond and would compete with the call it follows.
    fn keep_spare(&mut self) {
        if self.prefork && self.idle.is_empty() {
            let fd = self.fork_instance();
            self.idle.push(fd);
        }
    }

    fn fork_instance(&mut self) -> RawFd {
        let (ours, theirs) = match socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        ) {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("sand-grain: cannot make a socket pair: {e}");
                self.shut_down();
            }
        };
        // SAFETY: this process is single-threaded (checked before READY), so the child may run
        // any code; it never returns from this function (it ends in _exit).
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(ours);
                self.instances.clear(); // closes the other instances' sockets in this copy
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                instance_main(&self.chan, theirs, self.handler, self.reuse, self.prefork)
            }
            Ok(ForkResult::Parent { child }) => {
                drop(theirs);
                let fd = ours.as_raw_fd();
                self.instances.insert(
                    fd,
                    Instance {
                        pid: child,
                        sock: ours,
                        slot: None,
                        served: 0,
                    },
                );
                fd
            }
            Err(e) => {
                eprintln!("sand-grain: fork failed: {e}");
                self.shut_down();
            }
        }
    }

    fn shut_down(&mut self) -> ! {
        for inst in self.instances.values() {
            let _ = kill(inst.pid, Signal::SIGKILL);
        }
        exit_now(0)
    }
}

/// Collects retired instances that have exited. Only retired ones: a live instance's exit
/// status belongs to `instance_gone`, which reports it.
fn reap(retired: &mut Vec<Pid>) {
    retired.retain(|pid| {
        matches!(
            waitpid(*pid, Some(WaitPidFlag::WNOHANG)),
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR)
        )
    });
}

fn write_all(sock: &OwnedFd, mut data: &[u8]) -> nix::Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(sock, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_exact(sock: &OwnedFd, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(sock, &mut buf[got..]) {
            Ok(0) => return false,
            Ok(n) => got += n,
            Err(Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
    true
}

/// The next message from the zygote, or None at end-of-file.
fn recv_private(sock: &OwnedFd) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    if !read_exact(sock, &mut len) {
        return None;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MESSAGE_BYTES_MAX + 64 {
        return None;
    }
    let mut msg = vec![0u8; len];
    read_exact(sock, &mut msg).then_some(msg)
}

const STDOUT_NAME: &CStr = c"sand-stdout";
const STDERR_NAME: &CStr = c"sand-stderr";

fn instance_main(
    chan: &OwnedFd,
    sock: OwnedFd,
    handler: &dyn Fn(Value, &Ctx) -> Result<Output, String>,
    calls_max: u32,
    linger: bool,
) -> ! {
    let captures = memfd_create(STDOUT_NAME, MFdFlags::MFD_CLOEXEC)
        .and_then(|out| Ok((out, memfd_create(STDERR_NAME, MFdFlags::MFD_CLOEXEC)?)));
    let Ok((out, err)) = captures else {
        exit_now(71);
    };
    if nix::unistd::dup2_stdout(&out).is_err() || nix::unistd::dup2_stderr(&err).is_err() {
        exit_now(71);
    }
    let pid = std::process::id();
    for _ in 0..calls_max {
        let Some(msg) = recv_private(&sock) else {
            exit_now(0);
        };
        if msg.len() < 4 {
            exit_now(72);
        }
        let slot = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let result = run_call(handler, &msg[4..]);
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let (stdout, stdout_total) = take_capture(&out);
        let (stderr, stderr_total) = take_capture(&err);
        let body = ResultMsg {
            pid,
            result,
            stdout,
            stderr,
            stdout_total,
            stderr_total,
        }
        .encode();
        send_message(chan, Kind::Result, slot, &body);
    }
    if linger {
        while recv_private(&sock).is_some() {}
    }
    exit_now(0)
}

fn run_call(handler: &dyn Fn(Value, &Ctx) -> Result<Output, String>, body: &[u8]) -> Vec<u8> {
    let error = |text: String| {
        serde_json::json!({ "error": text })
            .to_string()
            .into_bytes()
    };
    let call = match CallMsg::decode(body) {
        Ok(call) => call,
        Err(e) => return error(format!("sand-grain: {e}")),
    };
    let event: Value = match serde_json::from_slice(&call.input) {
        Ok(v) => v,
        Err(e) => return error(format!("the input is not JSON: {e}")),
    };
    let ctx = Ctx {
        exec: call.exec,
        call: call.call,
        attempt: call.attempt,
    };
    match catch_unwind(AssertUnwindSafe(|| handler(event, &ctx))) {
        Ok(Ok(output)) => output.document().to_string().into_bytes(),
        Ok(Err(text)) => error(text),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string payload".into());
            error(format!("the handler panicked: {what}"))
        }
    }
}

/// The head of a capture file and its total size; empties it for the next call.
fn take_capture(fd: &OwnedFd) -> (Vec<u8>, u64) {
    let total = nix::sys::stat::fstat(fd).map_or(0, |st| st.st_size.max(0) as u64);
    let mut head = vec![0u8; (total as usize).min(CAPTURE_BYTES_MAX)];
    let n = nix::sys::uio::pread(fd, &mut head, 0).unwrap_or(0);
    head.truncate(n);
    if total > 0 {
        let _ = nix::unistd::ftruncate(fd, 0);
        let _ = nix::unistd::lseek(fd, 0, nix::unistd::Whence::SeekSet);
    }
    (head, total)
}
