//! Applying the mounts a snapshotter returns, as containerd does, so tests
//! can check them against the real kernel.

use std::path::Path;

use containerd_client::types::Mount;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Mounts `mounts` (one bind or overlay, as snapshotters return) at `target`.
pub fn apply(mounts: &[Mount], target: &Path) -> nix::Result<()> {
    assert_eq!(mounts.len(), 1, "expected one mount, got {mounts:?}");
    let m = &mounts[0];
    let ro = m.options.iter().any(|o| o == "ro");
    match m.r#type.as_str() {
        "bind" => {
            let rec = if m.options.iter().any(|o| o == "rbind") {
                MsFlags::MS_REC
            } else {
                MsFlags::empty()
            };
            mount(
                Some(m.source.as_str()),
                target,
                None::<&str>,
                MsFlags::MS_BIND | rec,
                None::<&str>,
            )?;
            if ro {
                mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )?;
            }
            Ok(())
        }
        "overlay" => {
            let data: Vec<&str> = m
                .options
                .iter()
                .map(String::as_str)
                .filter(|o| *o != "ro" && *o != "rw")
                .collect();
            let flags = if ro {
                MsFlags::MS_RDONLY
            } else {
                MsFlags::empty()
            };
            mount(
                Some("overlay"),
                target,
                Some("overlay"),
                flags,
                Some(data.join(",").as_str()),
            )
        }
        other => panic!("unexpected mount type {other}"),
    }
}

/// Unmounts `target`.
pub fn remove(target: &Path) -> nix::Result<()> {
    umount2(target, MntFlags::empty())
}
