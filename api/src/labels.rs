//! Snapshot labels: the keys containerd's CRI plugin and nerdctl put on a
//! layer's `Prepare` so a remote snapshotter can fetch the layer itself,
//! and the ones containerd's garbage collector reads.
//!
//! One definition for the snapshotter (which reads them), `hb image pull`
//! (which sends them like nerdctl does) and the test harness.

use std::collections::HashMap;

/// The chain id a layer snapshot will be committed as; its presence marks
/// an unpack that a remote snapshotter may short-cut with `AlreadyExists`.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// The image reference the layer belongs to.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The layer's compressed digest.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// The digest of the image manifest the layer comes from.
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Comma-separated compressed digests of this and the image's following
/// layers, cut to fit containerd's label size limit.
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Marks the snapshot's parent as a root for containerd's GC.
pub const GC_ROOT: &str = "containerd.io/gc.root";
/// Lets containerd's GC expire an unreferenced object after the time given.
pub const GC_EXPIRE: &str = "containerd.io/gc.expire";
/// containerd refuses labels whose key and value exceed this many bytes
/// together (`labels.Validate`).
pub const MAX_LABEL_SIZE: usize = 4096;

/// The labels CRI and nerdctl put on a layer's `Prepare` to let a remote
/// snapshotter fetch it: `layers_from_here` are the compressed digests of
/// this layer and the image's following ones.
///
/// # Panics
///
/// If `layers_from_here` is empty (there is no layer to label).
pub fn remote_snapshot_labels(
    image_ref: &str,
    manifest: &str,
    layers_from_here: &[String],
) -> HashMap<String, String> {
    HashMap::from([
        (CRI_IMAGE_REF.to_string(), image_ref.to_string()),
        (CRI_MANIFEST_DIGEST.to_string(), manifest.to_string()),
        (CRI_LAYER_DIGEST.to_string(), layers_from_here[0].clone()),
        (
            CRI_IMAGE_LAYERS.to_string(),
            image_layers_value(layers_from_here),
        ),
    ])
}

/// The `cri.image-layers` value for `digests` (this layer first), cut at
/// whole digests to fit containerd's label limit as CRI does.
pub fn image_layers_value(digests: &[String]) -> String {
    let budget = MAX_LABEL_SIZE - CRI_IMAGE_LAYERS.len();
    let mut out = String::new();
    for d in digests {
        let extra = if out.is_empty() { d.len() } else { d.len() + 1 };
        if out.len() + extra > budget {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_layers_are_cut_at_whole_digests_within_the_label_limit() {
        let d: Vec<String> = (0..100).map(|i| format!("sha256:{i:064x}")).collect();
        let v = image_layers_value(&d);
        assert!(v.len() + CRI_IMAGE_LAYERS.len() <= MAX_LABEL_SIZE);
        assert!(v.split(',').all(|x| x.len() == 71), "{v}");
        assert_eq!(v.split(',').next(), Some(d[0].as_str()));
        assert_eq!(image_layers_value(&d[..2]), format!("{},{}", d[0], d[1]));
        let l = remote_snapshot_labels("r/x:1", "sha256:m", &d[..2]);
        assert_eq!(l[CRI_LAYER_DIGEST], d[0]);
        assert_eq!(l[CRI_IMAGE_REF], "r/x:1");
    }
}
