//! `hyperbox-kernel`: what hyperbox asks of the running kernel.
//!
//! - [`features`]: probes that try the real thing (mount a file-backed EROFS
//!   image, put a pre-content fanotify mark on a file) and say how they
//!   decided; [`features::choose_backend`] turns them and the operator's
//!   `snapshotter.erofs_backend` into the backend the snapshotter uses.
//!   `hb doctor` shows the same results without linking the daemon.
//! - [`mount`]: read-only EROFS mounts from an image file or through a
//!   loop device, and finding and removing mounts under a directory, behind
//!   the [`mount::Mounter`] trait.
//! - [`fanotify`]: pre-content marks and the reads they hold, behind the
//!   [`fanotify::PreContent`] trait.
//! - `testing` (feature `fake`): recording fakes of both traits, so code
//!   that mounts or answers fanotify events is unit-tested without root.
//!
//! Every syscall hyperbox makes for its images goes through those two
//! traits; nothing else in the workspace mounts, attaches loop devices or
//! talks to fanotify.
//!
//! # Minimum kernel version
//!
//! EROFS on a loop device: 5.4. File-backed EROFS: 6.12. Pre-content
//! fanotify events (lazy pulls): 6.14.

#![deny(missing_docs)]

pub mod fanotify;
pub mod features;
pub mod fuse;
pub mod loopdev;
pub mod mount;
#[cfg(any(test, feature = "fake"))]
pub mod testing;
