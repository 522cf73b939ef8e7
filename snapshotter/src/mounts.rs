//! The mounts containerd receives for a snapshot on the local-unpack path:
//! plain `bind` and `overlay` mounts that containerd 1.7 and 2.x both apply.

use std::path::Path;

/// A mount for containerd to perform (`containerd.types.Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type: `bind` or `overlay`.
    pub kind: String,
    /// Source.
    pub source: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// Mounts of a writable snapshot whose own layer is `upper` (with overlay's
/// `work` dir) over `lowers`, nearest parent first.
pub fn active(upper: &Path, work: &Path, lowers: &[&Path]) -> Vec<Mount> {
    if lowers.is_empty() {
        return vec![bind(upper, false)];
    }
    vec![Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options: vec![
            // No inode index: it pins lower layers to this upper dir and
            // breaks when the same layer is mounted from several places.
            "index=off".into(),
            format!("workdir={}", work.display()),
            format!("upperdir={}", upper.display()),
            format!("lowerdir={}", join(lowers)),
        ],
    }]
}

/// Mounts of a read-only view of `lowers` (nearest first); `empty` is the
/// view's own (empty) directory, used when there is no parent.
pub fn view(empty: &Path, lowers: &[&Path]) -> Vec<Mount> {
    match lowers {
        [] => vec![bind(empty, true)],
        [one] => vec![bind(one, true)],
        // overlay without an upper dir needs at least two lower dirs.
        many => vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec!["index=off".into(), format!("lowerdir={}", join(many))],
        }],
    }
}

fn bind(dir: &Path, readonly: bool) -> Mount {
    Mount {
        kind: "bind".into(),
        source: dir.display().to_string(),
        options: vec![if readonly { "ro" } else { "rw" }.into(), "rbind".into()],
    }
}

fn join(dirs: &[&Path]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_layer_is_a_bind_and_stacks_are_overlays() {
        let (u, w) = (Path::new("/s/3/fs"), Path::new("/s/3/work"));
        assert_eq!(active(u, w, &[])[0].kind, "bind");
        assert_eq!(active(u, w, &[])[0].options, ["rw", "rbind"]);
        let m = &active(u, w, &[Path::new("/s/2/fs"), Path::new("/s/1/fs")])[0];
        assert_eq!(m.kind, "overlay");
        assert!(m.options.contains(&"lowerdir=/s/2/fs:/s/1/fs".to_string()));
        assert!(m.options.contains(&"upperdir=/s/3/fs".to_string()));
        assert_eq!(view(u, &[Path::new("/s/1/fs")])[0].options, ["ro", "rbind"]);
        assert_eq!(view(u, &[Path::new("/s/1/fs")])[0].source, "/s/1/fs");
        assert_eq!(
            view(u, &[Path::new("/a"), Path::new("/b")])[0].kind,
            "overlay"
        );
    }
}
