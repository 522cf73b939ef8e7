//! Lazy files a node cannot serve without the lazy path.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use hyperbox_kernel::fanotify::FileId;

use super::blob::file_id;

/// Why a lazy file an older hyperbox left in the whole-fetch cache is
/// refused.
pub(super) const LEGACY: &str =
    "its lazy layer was left incomplete by an older hyperbox; remove the image and pull it again";

/// Lazy files a node cannot serve without the lazy path (another EROFS
/// backend, no pre-content events, a failed probe): every file that is not
/// complete and verified. Snapshots on them are not mounted and no new
/// mount is made on them.
#[derive(Debug, Default)]
pub struct Unservable {
    pub(super) files: HashMap<FileId, String>,
}

impl Unservable {
    /// The lazy files under `root` that are incomplete, unverified or
    /// refused.
    pub fn scan(root: &Path) -> Unservable {
        let mut files = HashMap::new();
        for (dir, why) in [
            (
                root.join("lazy"),
                "its lazy layer is incomplete or unverified and this node cannot serve lazy layers now (erofs_backend or kernel); remove the image and pull it again to fetch it whole",
            ),
            (root.join("layers"), LEGACY),
        ] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(stem) = name
                    .strip_suffix(".lazy")
                    .or_else(|| name.strip_suffix(".lazy.corrupt"))
                else {
                    continue;
                };
                if let Some((id, _)) = file_id(&dir.join(format!("{stem}.erofs"))) {
                    files.insert(id, why.to_string());
                }
            }
        }
        Unservable { files }
    }

    /// How many files are refused.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Of `files`, those that can be served.
    pub fn servable(&self, files: Vec<PathBuf>) -> Vec<PathBuf> {
        files
            .into_iter()
            .filter(|p| file_id(p).is_some_and(|(id, _)| !self.files.contains_key(&id)))
            .collect()
    }
}

impl crate::snapshots::LayerGate for Unservable {
    fn refuse(&self, layer_file: &Path) -> Option<String> {
        let (id, _) = file_id(layer_file)?;
        self.files.get(&id).cloned()
    }
}
