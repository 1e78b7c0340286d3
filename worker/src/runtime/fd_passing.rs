//! Receiving file descriptors with a datagram (`SCM_RIGHTS`): how a zygote hands the worker
//! the private socket of each instance it forks.

#![allow(unsafe_code)] // Taking ownership of the fds the kernel installed for a message.

use std::io;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// The most fds one message may bring; a zygote sends one at a time.
const FDS_PER_MESSAGE_MAX: usize = 4;

/// Receives one datagram into `buf` without blocking: its length, and the fds that came with
/// it (close-on-exec, owned by the caller). `WouldBlock` when none is waiting.
pub(crate) fn receive(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE_MAX]);
    let flags = MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT;
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), flags)?;
    let mut fds = Vec::new();
    // An error here is MSG_CTRUNC: the peer sent more fds than a message may bring.
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel installed these fds in this process for this message just
            // now; nothing else knows them, so each gets exactly one owner.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((msg.bytes, fds))
}
