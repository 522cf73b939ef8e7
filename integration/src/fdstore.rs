//! A service manager's file descriptor store, as systemd keeps one for a
//! unit with `FileDescriptorStoreMax=`: a `NOTIFY_SOCKET` datagram socket
//! that takes `FDSTORE=1` messages with their fds (`SCM_RIGHTS`), and the
//! `LISTEN_FDS`/`LISTEN_FDNAMES`/`LISTEN_PID` hand-back at the next start.
//!
//! It plays systemd's part of a documented protocol (`sd_notify(3)`,
//! `sd_listen_fds(3)`) so the snapshotter's own code is what is tested; it
//! does not stand in for containerd, a registry or the kernel.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

/// The store: its socket and the fds kept so far, by name.
#[derive(Debug)]
pub struct FdStore {
    path: PathBuf,
    socket: UnixDatagram,
    kept: Vec<(String, OwnedFd)>,
}

impl FdStore {
    /// Binds the notify socket at `path`.
    pub fn bind(path: &Path) -> std::io::Result<FdStore> {
        let _ = std::fs::remove_file(path);
        let socket = UnixDatagram::bind(path)?;
        socket.set_nonblocking(true)?;
        Ok(FdStore {
            path: path.into(),
            socket,
            kept: Vec::new(),
        })
    }

    /// `NOTIFY_SOCKET` for the service.
    pub fn notify_socket(&self) -> &Path {
        &self.path
    }

    /// Takes every message sent so far; keeps the fds of `FDSTORE=1` ones
    /// under their `FDNAME` (a name stored again replaces the old fd).
    pub fn receive(&mut self) {
        loop {
            let mut buf = [0u8; 4096];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!([RawFd; 16]);
            let Ok(msg) = recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                return;
            };
            let mut fds = Vec::new();
            for c in msg.cmsgs().into_iter().flatten() {
                if let ControlMessageOwned::ScmRights(r) = c {
                    // SAFETY: the kernel installed these fds in our table
                    // for this message; nothing else owns them.
                    fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            let len = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            let store = text.lines().any(|l| l == "FDSTORE=1");
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_string();
            if store {
                for fd in fds {
                    self.kept.retain(|(n, _)| *n != name);
                    self.kept.push((name.clone(), fd));
                }
            }
        }
    }

    /// The names of the fds kept.
    pub fn names(&self) -> Vec<String> {
        self.kept.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The kept fds, to pass as 3, 4, … (`LISTEN_FDS`).
    pub fn fds(&self) -> Vec<RawFd> {
        self.kept.iter().map(|(_, fd)| fd.as_raw_fd()).collect()
    }

    /// Forgets every kept fd, as a service manager does on a full stop.
    pub fn clear(&mut self) {
        self.kept.clear();
    }
}
