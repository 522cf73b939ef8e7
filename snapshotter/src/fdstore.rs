//! Keeps the lazy path's fanotify group alive across daemon restarts in the
//! service manager's file descriptor store (systemd `FDSTORE=1`,
//! `FileDescriptorStoreMax=` in the unit; `sd_notify(3)`,
//! `sd_listen_fds(3)`).
//!
//! The group holds the marks of incomplete lazy layers. If it dies with the
//! daemon, unfetched ranges of mounted layers read as zeros until the next
//! start. If the service manager holds it, reads made while the daemon is
//! down wait in the kernel and are answered by the next instance, which
//! takes the group back from `LISTEN_FDS` under the name [`FD_NAME`].
//!
//! The protocol is systemd's, spoken through the `sd-notify` crate; any
//! service manager that implements it (or a test standing in for one) works.

use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use hyperbox_kernel::fanotify::Fanotify;

/// The name the group is stored under.
pub const FD_NAME: &str = "hyperbox-fanotify";
/// fd numbers the previous instance may have used for held reads.
const ORPHAN_SCAN: i32 = 4096;

/// The fanotify group, and whether it was taken over from an earlier
/// instance (its marks intact: nothing read zeros meanwhile).
#[derive(Debug)]
pub struct Group {
    /// The group.
    pub group: Fanotify,
    /// Taken over from the fd store.
    pub kept: bool,
}

/// The group the service manager kept for us, or a new one, which is then
/// handed to the service manager to keep (when there is one).
pub fn fanotify_group() -> io::Result<Group> {
    for (fd, name) in sd_notify::listen_fds_with_names()? {
        if name != FD_NAME {
            continue;
        }
        // SAFETY: the service manager passed this fd to us alone (LISTEN_PID
        // is ours, checked by listen_fds_with_names); nothing else in this
        // process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        match Fanotify::from_fd(owned) {
            Ok(group) => {
                let denied = group.deny_orphaned(ORPHAN_SCAN);
                tracing::info!(
                    denied,
                    "fanotify group taken back from the service manager: reads made while the daemon was down were held, not answered with zeros"
                );
                return Ok(Group { group, kept: true });
            }
            Err(e) => {
                tracing::warn!(fd, error = %e, "the stored fd is not a fanotify group; making a new one");
            }
        }
    }
    let group = Fanotify::open()?;
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let states = [
            sd_notify::NotifyState::FdStore,
            sd_notify::NotifyState::FdName(FD_NAME),
        ];
        match sd_notify::notify_with_fds(&states, &[group.as_fd()]) {
            Ok(()) => tracing::info!(
                "fanotify group handed to the service manager's fd store; lazy reads wait across restarts"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "the service manager did not take the fanotify group (FileDescriptorStoreMax= unset?); while the daemon is down, unfetched lazy data reads as zeros"
            ),
        }
    } else {
        tracing::info!(
            "no service manager (NOTIFY_SOCKET unset): the fanotify group dies with the daemon, and unfetched lazy data reads as zeros while it is down"
        );
    }
    Ok(Group { group, kept: false })
}
