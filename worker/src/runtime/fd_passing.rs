//! Receiving file descriptors with a datagram (`SCM_RIGHTS`): how a zygote hands the worker
//! the private socket of each instance it forks.
//!
//! Every fd the kernel installs in the worker for a message gets an owner here, also when the
//! peer sent more than the control buffer holds (the kernel then installs those that fit,
//! closes the rest, and flags the message `MSG_CTRUNC`). nix refuses to read a truncated
//! control buffer, which would leave the fds that did arrive open and unowned; this module
//! reads it with libc's cmsg walk, bounded by the length the kernel reports.

#![allow(unsafe_code)] // recvmsg with a raw control buffer, and owning the fds it installed.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;

/// The most fds a message of the wire carries: a `SPARE` brings one; no other message any.
/// The control buffer is sized for this (the kernel may fit one more into its alignment
/// padding); a message that brings more arrives truncated.
const FDS_PER_MESSAGE_MAX: usize = 1;

/// The control buffer's size: room for one `SCM_RIGHTS` header and its fds.
const CONTROL_BYTES: usize = {
    // SAFETY: CMSG_SPACE only computes an aligned length from its argument.
    unsafe { libc::CMSG_SPACE((FDS_PER_MESSAGE_MAX * size_of::<RawFd>()) as u32) as usize }
};

/// A control buffer aligned for the `cmsghdr`s the kernel writes into it.
#[repr(C, align(8))]
struct ControlBuffer([u8; CONTROL_BYTES]);

/// One datagram as it was received.
pub(crate) struct Received {
    /// Its length.
    pub(crate) len: usize,
    /// The fds that came with it (close-on-exec, owned here: dropping them closes them).
    pub(crate) fds: Vec<OwnedFd>,
    /// The peer sent more fds than the control buffer holds: `fds` are those that fit, and
    /// the kernel closed the rest. Always a protocol error.
    pub(crate) fds_truncated: bool,
}

/// Receives one datagram into `buf` without blocking, with every fd that came with it.
/// `WouldBlock` when none is waiting.
pub(crate) fn receive(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut control = ControlBuffer([0; CONTROL_BYTES]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct; all zeroes is an empty header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_BYTES as _;
    let len = loop {
        // SAFETY: `msg` points at `iov` (which points at `buf`) and at `control`, all live and
        // writable for the lengths given, for the whole call.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    Ok(Received {
        len,
        // Taken before anything else can fail: from here on every fd has its owner.
        fds: installed_fds(&msg),
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Takes ownership of every fd in the `SCM_RIGHTS` messages of a header `recvmsg` just filled.
fn installed_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    let control_end = msg.msg_control as usize + msg.msg_controllen;
    // SAFETY: `msg` is the header recvmsg filled: its msg_control and msg_controllen describe
    // the control data the kernel wrote (on truncation, only whole fds it installed), and
    // CMSG_FIRSTHDR and CMSG_NXTHDR return only headers that lie within it, or null.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from the walk lies within the (aligned) control buffer.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_DATA points just past this header.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            let data_end = (cmsg as usize + header.cmsg_len as usize).min(control_end);
            let count = data_end.saturating_sub(data as usize) / size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: fd `i` lies within this message's data, which lies within the buffer
                // (`count` is bounded by both); data after a header may be unaligned for an int.
                let fd = unsafe { data.cast::<RawFd>().add(i).read_unaligned() };
                // SAFETY: the kernel installed this fd in this process for this message just
                // now; nothing else knows it, so it gets exactly one owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: `cmsg` is a header of this message (see above).
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSlice;
    use std::os::fd::AsFd;

    use nix::sys::socket::{
        sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
    };

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("a socket pair")
    }

    fn send_with_fds(sock: &OwnedFd, data: &[u8], fds: &[OwnedFd]) {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(data)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
    }

    /// Whether `fd` is an open fd of this process.
    fn is_open(fd: &OwnedFd) -> bool {
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok()
    }

    #[test]
    fn one_fd_arrives_owned_and_usable() {
        let (ours, theirs) = pair();
        let (a, b) = pair();
        send_with_fds(&theirs, b"spare", &[a]);
        let mut buf = [0u8; 16];
        let got = receive(ours.as_fd(), &mut buf).expect("receive");
        assert_eq!(&buf[..got.len], b"spare");
        assert!(!got.fds_truncated);
        assert_eq!(got.fds.len(), 1);
        // The received fd is the far end of `b`'s pair: what goes in one comes out the other.
        nix::unistd::write(&got.fds[0], b"x").expect("write");
        let mut one = [0u8; 1];
        assert_eq!(nix::unistd::read(&b, &mut one), Ok(1));
    }

    #[test]
    fn more_fds_than_fit_are_flagged_and_every_installed_fd_is_owned() {
        let (ours, theirs) = pair();
        let sent: Vec<OwnedFd> = (0..6)
            .map(|_| std::fs::File::open("/dev/null").expect("open").into())
            .collect();
        send_with_fds(&theirs, b"hostile", &sent);
        drop(sent);
        let mut buf = [0u8; 16];
        let got = receive(ours.as_fd(), &mut buf).expect("receive");
        assert_eq!(&buf[..got.len], b"hostile", "the data arrives whole");
        assert!(got.fds_truncated, "6 fds do not fit");
        assert!(
            (1..6).contains(&got.fds.len()),
            "the kernel installed those that fit: {}",
            got.fds.len()
        );
        assert!(
            got.fds.iter().all(is_open),
            "each is a real fd of this process, closed when the message is dropped"
        );
    }

    #[test]
    fn nothing_waiting_is_would_block() {
        let (ours, _theirs) = pair();
        let mut buf = [0u8; 16];
        let e = receive(ours.as_fd(), &mut buf)
            .err()
            .expect("nothing to receive");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
