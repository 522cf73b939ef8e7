//! Disk usage of a directory tree as `du` counts it: allocated blocks, each
//! inode once however many hard links reach it, without following symlinks
//! or crossing into other filesystems.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::store::Usage;

/// Usage of everything below and including `dir`.
pub fn disk_usage(dir: &Path) -> io::Result<Usage> {
    let root = std::fs::symlink_metadata(dir)?;
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    add(&root, &mut seen, &mut usage);
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = match entry.path().symlink_metadata() {
                Ok(m) => m,
                // Removed while we walk: an active snapshot may be in use.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            add(&meta, &mut seen, &mut usage);
            if meta.is_dir() && meta.dev() == root.dev() {
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

fn add(meta: &std::fs::Metadata, seen: &mut HashSet<(u64, u64)>, usage: &mut Usage) {
    if seen.insert((meta.dev(), meta.ino())) {
        usage.inodes += 1;
        usage.size += (meta.blocks() * 512) as i64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_links_count_once_and_sizes_are_allocated_blocks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![1u8; 10_000]).unwrap();
        std::fs::hard_link(d.path().join("a"), d.path().join("b")).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("sub/l")).unwrap();
        let u = disk_usage(d.path()).unwrap();
        // root dir, a (= b), sub, sub/l
        assert_eq!(u.inodes, 4);
        assert!(u.size >= 10_000, "{u:?}");
        let alone = disk_usage(&d.path().join("sub")).unwrap();
        assert_eq!(alone.inodes, 2);
    }
}
