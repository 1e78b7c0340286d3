//! The zygote loop of a Rust grain: the same behaviour as the Python runtime.
//!
//! The zygote makes itself non-dumpable before it says `READY`, so its instances (which inherit
//! that) cannot read it or each other through `/proc`, ptrace or `pidfd_getfd`. It forks
//! instances and hands each one's private socket to the worker (`SPARE`, by `SCM_RIGHTS`), so
//! the worker writes calls straight to an instance without waking the zygote. It forks a spare
//! when the worker asks (`WANT`, sent once a call's result is out, never while a call is handed
//! over); a `CALL` that reaches it (the worker held no spare) forks an instance on the spot,
//! hands it over already serving the call, and relays the call. The instance closes its copy of
//! fd 3 first thing, runs the handler with its stdout and stderr captured in memory files,
//! writes its result on its private socket, and then waits there for the next call
//! (`--reuse N`) or the end-of-file of the worker closing it, on which it exits. The zygote
//! watches every instance by pidfd and reports each end as `DIED`; `KILL` names an instance by
//! its number.

#![allow(unsafe_code)] // fork, taking fd 3, and _exit in forked children.

use std::ffi::CStr;
use std::io::{IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    send, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde_json::Value;

use crate::wire::{
    parse_piece, pieces, private_frame, CallMsg, DiedMsg, End, KillMsg, Kind, Reassembler,
    ResultMsg, SpareMsg, CAPTURE_BYTES_MAX, CHANNEL_FD, HEADER_BYTES, MESSAGE_BYTES_MAX,
    PIECE_BODY_BYTES_MAX,
};
use crate::{Ctx, Output};

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
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        let why = format!("cannot make the zygote non-dumpable ({e}): its instances could read it");
        send_message(&chan, Kind::LoadFailed, 0, why.as_bytes());
        return Err(why);
    }
    send_message(&chan, Kind::Ready, 0, &std::process::id().to_le_bytes());
    let mut zygote = Zygote {
        chan,
        handler,
        reuse: if prefork { reuse } else { 1 },
        instances: Vec::new(),
        numbered: 0,
        // The worker is trusted, and what the zygote holds is in the app's own memory limit.
        calls: Reassembler::new(MESSAGE_BYTES_MAX, usize::MAX),
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

/// An instance the zygote has forked and not yet reaped.
struct Instance {
    /// The zygote's number for it (see the wire).
    number: u32,
    pid: Pid,
    /// Readable once it has exited.
    pidfd: OwnedFd,
}

struct Zygote<'h> {
    chan: OwnedFd,
    handler: &'h dyn Fn(Value, &Ctx) -> Result<Output, String>,
    reuse: u32,
    /// Every instance not yet reaped.
    instances: Vec<Instance>,
    /// The last instance number given.
    numbered: u32,
    calls: Reassembler,
}

impl Zygote<'_> {
    fn serve(&mut self) -> ! {
        let mut buf = vec![0u8; HEADER_BYTES + PIECE_BODY_BYTES_MAX + 1];
        loop {
            let (chan_ready, ended) = {
                let mut fds = vec![PollFd::new(self.chan.as_fd(), PollFlags::POLLIN)];
                fds.extend(
                    self.instances
                        .iter()
                        .map(|inst| PollFd::new(inst.pidfd.as_fd(), PollFlags::POLLIN)),
                );
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => {
                        eprintln!("sand-grain: poll failed: {e}");
                        self.shut_down();
                    }
                }
                let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                let ended: Vec<u32> = fds[1..]
                    .iter()
                    .zip(&self.instances)
                    .filter(|(f, _)| ready(f))
                    .map(|(_, inst)| inst.number)
                    .collect();
                (ready(&fds[0]), ended)
            };
            if chan_ready {
                match nix::sys::socket::recv(self.chan.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(0) => self.shut_down(),
                    Ok(n) => self.on_piece(&buf[..n]),
                    Err(Errno::EINTR | Errno::EAGAIN) => {}
                    Err(_) => self.shut_down(),
                }
            }
            for number in ended {
                self.instance_ended(number);
            }
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
                    self.call(header.slot, &message);
                }
            }
            Kind::Want => drop(self.hand_over(0)),
            Kind::Kill => {
                let Ok(KillMsg { instance }) = KillMsg::decode(body) else {
                    return;
                };
                if let Some(inst) = self.instances.iter().find(|i| i.number == instance) {
                    let _ = kill(inst.pid, Signal::SIGKILL);
                }
            }
            _ => {}
        }
    }

    /// The worker held no spare for this call: fork one, hand it over already serving the call
    /// (its `SPARE`, with the call's slot, goes out before the call, so the worker has it
    /// before its result), and relay the call.
    fn call(&mut self, slot: u32, call: &[u8]) {
        let ours = self.hand_over(slot);
        // A failed write means it died: its DIED reports the call.
        let _ = write_all(&ours, &private_frame(slot, call));
    }

    /// Forks an instance and sends the worker its private socket (`SPARE`, for `slot`).
    /// Returns the zygote's copy of the socket, which the caller drops: the worker's copy is
    /// then the only one, and its closing is the instance's end-of-file.
    fn hand_over(&mut self, slot: u32) -> OwnedFd {
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
        let pid = match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                // Before any handler code: the instance keeps no way to the zygote's channel
                // (the `OwnedFd` is never used nor dropped again: the child ends in _exit).
                if nix::unistd::close(self.chan.as_raw_fd()).is_err() {
                    exit_now(73);
                }
                drop(ours);
                self.instances.clear(); // closes the other instances' pidfds in this copy
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                instance_main(theirs, self.handler, self.reuse)
            }
            Ok(ForkResult::Parent { child }) => child,
            Err(e) => {
                eprintln!("sand-grain: fork failed: {e}");
                self.shut_down();
            }
        };
        drop(theirs);
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("sand-grain: cannot watch instance {pid}: {e}");
                let _ = kill(pid, Signal::SIGKILL);
                self.shut_down();
            }
        };
        self.numbered = self.numbered.wrapping_add(1).max(1);
        let number = self.numbered;
        self.instances.push(Instance { number, pid, pidfd });
        let body = SpareMsg {
            instance: number,
            pid: pid.as_raw() as u32,
        }
        .encode();
        let piece = pieces(Kind::Spare, slot, &body).concat();
        let fds = [ours.as_raw_fd()];
        loop {
            match sendmsg::<()>(
                self.chan.as_raw_fd(),
                &[IoSlice::new(&piece)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(_) => self.shut_down(), // the worker is gone
            }
        }
        ours
    }

    /// An instance's pidfd is readable: it has exited. Reaps it and reports its end (`DIED`).
    fn instance_ended(&mut self, number: u32) {
        let Some(at) = self.instances.iter().position(|i| i.number == number) else {
            return;
        };
        let inst = self.instances.swap_remove(at);
        let status = loop {
            match waitpid(inst.pid, None) {
                Err(Errno::EINTR) => continue,
                other => break other,
            }
        };
        let end = match status {
            Ok(WaitStatus::Signaled(_, sig, _)) => End::Signaled(sig as i32),
            Ok(WaitStatus::Exited(_, code)) => End::Exited(code),
            _ => End::Exited(-1),
        };
        let died = DiedMsg {
            instance: inst.number,
            end,
        };
        send_message(&self.chan, Kind::Died, 0, &died.encode());
    }

    fn shut_down(&mut self) -> ! {
        for inst in &self.instances {
            let _ = kill(inst.pid, Signal::SIGKILL);
        }
        exit_now(0)
    }
}

/// A pidfd for a child (nix has no `pidfd_open`): readable once the child has exited.
fn pidfd_open(pid: Pid) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; it touches no memory
    // of ours.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the syscall returned a new fd (pidfds are close-on-exec) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
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

/// One forked instance: serves up to `calls_max` calls from its private socket, answering each
/// there, then waits for the worker to close the socket (it has read the last result), and
/// exits.
fn instance_main(
    sock: OwnedFd,
    handler: &dyn Fn(Value, &Ctx) -> Result<Output, String>,
    calls_max: u32,
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
    for served in 0..calls_max {
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
            served,
            result,
            stdout,
            stderr,
            stdout_total,
            stderr_total,
        }
        .encode();
        if write_all(&sock, &private_frame(slot, &body)).is_err() {
            exit_now(0); // the worker let it go
        }
    }
    while recv_private(&sock).is_some() {}
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
        call: format!("{:016x}", call.call),
        attempt: call.attempt,
        trace: call.trace,
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
