//! Prefetch lists learned from real runs: for one EROFS image (a layer's
//! lazy form), the chunks containers first read, in first-read order.
//!
//! A node keeps what it learned in its [`Store`]; `hb image prefetch push`
//! shares those lists as a small OCI artifact beside the image's hyperbox
//! index ([`Shared`]), so a node that never ran the image fetches the same
//! chunks first. A list is bound to one EROFS image (by digest) and one
//! chunk size, so it can never point into other bytes, and it only orders
//! fetches: every chunk is still checked against the index. The worst a
//! hostile list can do is have a node fetch up to the snapshotter's cap of
//! chunks early, which the image itself could make it fetch anyway.
//!
//! The artifact is an OCI image manifest whose config is the [`Shared`]
//! document, whose one layer is the empty descriptor and whose `subject`
//! is the image manifest, under the tag [`tag_for`] derives from the image
//! manifest digest (as the index is found on registries without the
//! referrers API).
//!
//! Node lists live in `<root>/prefetch/<erofs hex>-<chunk size>.json`
//! (two indexes of one EROFS image with different chunk sizes keep a list
//! each), written whole to a temporary file and renamed. A list that
//! cannot be read is ignored (and replaced at the next save), never fatal.

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::Error;

/// Media type of the [`Shared`] document (the artifact's config).
pub const CONFIG_TYPE: &str = "application/vnd.hyperbox.prefetch.v1+json";
/// Lists and shared documents larger than this are not read: a list holds
/// one number per chunk read, and 4 MiB is far above any real one.
pub const MAX_DOCUMENT: u64 = 4 << 20;
const VERSION: u32 = 1;
/// The most of a layer a list has fetched ahead, from its start: a
/// container that read a whole layer (a `find -exec cat`) must not turn
/// every later pull of it into a full fetch at read priority. Lists are
/// pushed cut to this too.
pub const MAX_AHEAD: u64 = 64 << 20;
/// A node's list that no lazy pull used or extended for this long is
/// removed when the snapshotter starts: the image is most likely gone from
/// the node, and a later pull learns again (or finds a shared list).
pub const UNUSED_FOR: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// The tag the shared prefetch lists of the image with manifest `manifest`
/// are pushed under.
pub fn tag_for(manifest: &Digest) -> String {
    format!("sha256-{}.hyperbox-prefetch", manifest.hex())
}

/// Appends to `order` the chunks of `more` it does not hold yet, keeping
/// what was first read first.
pub fn merge(order: &mut Vec<usize>, more: &[usize]) {
    let mut seen: HashSet<usize> = order.iter().copied().collect();
    order.extend(more.iter().copied().filter(|c| seen.insert(*c)));
}

/// Annotation of a learned-checkpoints layer of the artifact: the layer
/// blob (by digest) the checkpoints are places in.
pub const POINTS_LAYER: &str = "dev.hyperbox.layer";
/// Annotation of a learned-checkpoints layer: the length of its eager
/// part (`hyperbox_erofs::learned`).
pub const POINTS_EAGER: &str = "dev.hyperbox.eager";
/// The largest learned-checkpoints blob a node reads from.
pub const MAX_POINTS_BLOB: u64 = 1 << 30;

/// Checkpoints learned for one gzip layer blob, pushed as a layer of the
/// artifact (`hyperbox_erofs::learned`): where the listed reads begin in
/// the layer, so a node starts each near its own bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsRef {
    /// The layer blob the checkpoints are places in.
    pub layer: String,
    /// The checkpoints blob.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// The length of its eager part.
    pub eager: u64,
}

impl PointsRef {
    /// The reference an artifact layer descriptor makes, if it is one
    /// (media type and annotations), checked; `None` for other layers.
    pub fn of(
        media_type: &str,
        digest: &str,
        size: i64,
        annotations: &std::collections::HashMap<String, String>,
    ) -> Result<Option<PointsRef>, String> {
        if media_type != POINTS_TYPE {
            return Ok(None);
        }
        let layer = annotations
            .get(POINTS_LAYER)
            .ok_or_else(|| format!("learned checkpoints {digest} name no layer"))?;
        Digest::parse(layer).map_err(|e| e.to_string())?;
        Digest::parse(digest).map_err(|e| e.to_string())?;
        let eager = annotations
            .get(POINTS_EAGER)
            .and_then(|e| e.parse::<u64>().ok())
            .ok_or_else(|| format!("learned checkpoints {digest} have no eager length"))?;
        let size = u64::try_from(size).map_err(|_| format!("{digest}: negative size"))?;
        if size > MAX_POINTS_BLOB || eager < 16 || eager > size {
            return Err(format!(
                "learned checkpoints {digest}: eager part of {eager} bytes in a blob of {size}"
            ));
        }
        Ok(Some(PointsRef {
            layer: layer.clone(),
            digest: digest.into(),
            size,
            eager,
        }))
    }

    /// The annotations of its artifact layer descriptor.
    pub fn annotations(&self) -> std::collections::HashMap<String, String> {
        [
            (POINTS_LAYER.to_string(), self.layer.clone()),
            (POINTS_EAGER.to_string(), self.eager.to_string()),
        ]
        .into()
    }
}

/// Media type of a learned-checkpoints layer (as `hyperbox_erofs::learned`
/// names it; the registry crate does not depend on the EROFS one).
pub const POINTS_TYPE: &str = "application/vnd.hyperbox.learned-points.v1";

/// One layer's shared list, fitted to an index: the chunks to fetch
/// first, and the checkpoints learned for its layer blob, if pushed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fitted {
    /// Chunk numbers in first-read order, without repeats.
    pub chunks: Vec<usize>,
    /// Learned checkpoints of the layer blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<PointsRef>,
}

/// One EROFS image's list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct List {
    /// The EROFS image's digest, as the index names it.
    pub erofs: String,
    /// Bytes per chunk, as the index that was read had them (4 KiB for
    /// a layer with a block table: what the node tracked).
    pub chunk_size: u64,
    /// Chunk numbers in first-read order.
    pub chunks: Vec<usize>,
}

/// The shared document: the lists of an image's layers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shared {
    /// Format version: 1.
    pub version: u32,
    /// One list per EROFS image.
    pub lists: Vec<List>,
    /// Learned checkpoints, from the artifact's layers (not the document).
    #[serde(skip)]
    pub points: Vec<PointsRef>,
}

impl Shared {
    /// An empty document of this version.
    pub fn new() -> Shared {
        Shared {
            version: VERSION,
            lists: Vec::new(),
            points: Vec::new(),
        }
    }

    /// Parses and checks a shared document; `what` names it in errors.
    pub fn parse(bytes: &[u8], what: &str) -> Result<Shared, Error> {
        let bad = |why: String| Error::Manifest {
            reference: what.into(),
            why,
        };
        if bytes.len() as u64 > MAX_DOCUMENT {
            return Err(bad(format!(
                "prefetch document of {} bytes, more than {MAX_DOCUMENT}",
                bytes.len()
            )));
        }
        let doc: Shared =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("prefetch document: {e}")))?;
        if doc.version != VERSION {
            return Err(bad(format!(
                "prefetch document version {} is not {VERSION}",
                doc.version
            )));
        }
        for l in &doc.lists {
            Digest::parse(&l.erofs)?;
            if l.chunk_size < 4096 || !l.chunk_size.is_multiple_of(4096) {
                return Err(bad(format!(
                    "{}: chunk size {} is not a multiple of 4 KiB",
                    l.erofs, l.chunk_size
                )));
            }
        }
        Ok(doc)
    }

    /// The list of `erofs` read in chunks of `chunk_size`, if shared.
    pub fn list(&self, erofs: &str, chunk_size: u64) -> Option<&[usize]> {
        self.lists
            .iter()
            .find(|l| l.erofs == erofs && l.chunk_size == chunk_size)
            .map(|l| l.chunks.as_slice())
    }

    /// The lists of this document that fit `index`: by EROFS image, only
    /// for the images the index names, read in its chunk size, without
    /// repeats, cut to [`MAX_AHEAD`]. A list naming a chunk past its layer
    /// was not made from it and is left out with a warning (`what` names
    /// the document). What is returned is bounded by the index itself.
    pub fn for_index(
        &self,
        index: &crate::index::Index,
        what: &str,
    ) -> std::collections::HashMap<String, Fitted> {
        let mut out = std::collections::HashMap::new();
        for layer in &index.layers {
            if out.contains_key(&layer.erofs) {
                continue;
            }
            // Lists are in the units a node tracks: blocks under a block
            // table.
            let cs = layer.unit(index.chunk_size);
            let most = (MAX_AHEAD / cs) as usize;
            let Some(list) = self.list(&layer.erofs, cs) else {
                continue;
            };
            if let Some(why) = misfit(list, layer.units(index.chunk_size)) {
                tracing::warn!(document = what, erofs = %layer.erofs, why, "shared prefetch list ignored");
                continue;
            }
            let mut order = Vec::new();
            merge(&mut order, list);
            order.truncate(most);
            let points = self.points.iter().find(|p| p.layer == layer.layer).cloned();
            out.insert(
                layer.erofs.clone(),
                Fitted {
                    chunks: order,
                    points,
                },
            );
        }
        out
    }

    /// Cuts every list to what a node ever fetches ahead ([`MAX_AHEAD`]).
    pub fn cut(&mut self) {
        for l in &mut self.lists {
            l.chunks.truncate((MAX_AHEAD / l.chunk_size) as usize);
        }
    }

    /// Merges `chunks` into the list of `erofs` (after what it holds),
    /// adding the list if it is new.
    pub fn merge(&mut self, erofs: &str, chunk_size: u64, chunks: &[usize]) {
        match self
            .lists
            .iter_mut()
            .find(|l| l.erofs == erofs && l.chunk_size == chunk_size)
        {
            Some(l) => merge(&mut l.chunks, chunks),
            None if !chunks.is_empty() => {
                let mut order = Vec::new();
                merge(&mut order, chunks);
                self.lists.push(List {
                    erofs: erofs.into(),
                    chunk_size,
                    chunks: order,
                });
            }
            None => {}
        }
    }
}

/// Why a list does not fit a layer of `chunks` chunks, if it does not.
pub fn misfit(list: &[usize], chunks: usize) -> Option<String> {
    list.iter()
        .find(|c| **c >= chunks)
        .map(|bad| format!("chunk {bad} of a layer of {chunks}"))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    chunk_size: u64,
    /// Chunk numbers in first-read order, merged over runs.
    chunks: Vec<usize>,
}

/// A node's learned lists.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    /// Loads mark a list used (the snapshotter's store, not `hb`'s).
    touch: bool,
}

impl Store {
    /// The lists under `<root>/prefetch`, created if missing, for the
    /// snapshotter that writes them; temporary files of saves a crash cut
    /// short and lists unused for [`UNUSED_FOR`] are removed.
    pub fn open(root: &Path) -> std::io::Result<Store> {
        let dir = root.join("prefetch");
        fs::create_dir_all(&dir)?;
        let now = std::time::SystemTime::now();
        for e in fs::read_dir(&dir)?.flatten() {
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > UNUSED_FOR);
            let name = e.file_name().to_string_lossy().into_owned();
            let list = name
                .strip_suffix(".json")
                .and_then(|stem| stem.split_once('-'))
                .is_some_and(|(hex, size)| {
                    hex.len() == 64
                        && hex.bytes().all(|b| b.is_ascii_hexdigit())
                        && size.parse::<u64>().is_ok()
                });
            if name.ends_with(".tmp") || (list && stale) {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(Store { dir, touch: true })
    }

    /// The lists under `<root>/prefetch` for reading only (`hb`): nothing
    /// is created or cleaned while the snapshotter may be saving.
    pub fn reader(root: &Path) -> Store {
        Store {
            dir: root.join("prefetch"),
            touch: false,
        }
    }

    fn path(&self, erofs: &str, chunk_size: u64) -> PathBuf {
        let hex = erofs.strip_prefix("sha256:").unwrap_or(erofs);
        self.dir.join(format!("{hex}-{chunk_size}.json"))
    }

    /// Whether a list that fits was learned for the EROFS image `erofs`
    /// read in chunks of `chunk_size`, of which it has `chunks` (without
    /// marking it used).
    pub fn has(&self, erofs: &str, chunk_size: u64, chunks: usize) -> bool {
        !self.read(erofs, chunk_size, chunks, false).is_empty()
    }

    /// The learned order for the EROFS image `erofs` read in chunks of
    /// `chunk_size`, of which it has `chunks`; empty when none was learned
    /// or the list does not fit this layer.
    pub fn load(&self, erofs: &str, chunk_size: u64, chunks: usize) -> Vec<usize> {
        self.read(erofs, chunk_size, chunks, self.touch)
    }

    /// [`Store::load`], marking the list used if `touch`.
    fn read(&self, erofs: &str, chunk_size: u64, chunks: usize, touch: bool) -> Vec<usize> {
        let path = self.path(erofs, chunk_size);
        let read = || -> Result<Vec<usize>, String> {
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e.to_string()),
            };
            if meta.len() > MAX_DOCUMENT {
                return Err(format!("{} bytes, more than {MAX_DOCUMENT}", meta.len()));
            }
            let text = fs::read(&path).map_err(|e| e.to_string())?;
            let f: File = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
            if f.version != VERSION || f.chunk_size != chunk_size {
                return Ok(Vec::new());
            }
            if let Some(why) = misfit(&f.chunks, chunks) {
                return Err(why);
            }
            if touch && !f.chunks.is_empty() {
                // Used: not stale (see `open`).
                let _ = fs::File::options()
                    .write(true)
                    .open(&path)
                    .and_then(|file| file.set_modified(std::time::SystemTime::now()));
            }
            Ok(f.chunks)
        };
        read().unwrap_or_else(|why| {
            tracing::warn!(file = %path.display(), why, "learned prefetch list ignored");
            Vec::new()
        })
    }

    /// Merges `learned` (chunk numbers in first-read order) into the list
    /// of `erofs`: what was learned before keeps its place, new chunks go
    /// after it. Returns the length of the list.
    pub fn save(
        &self,
        erofs: &str,
        chunk_size: u64,
        chunks: usize,
        learned: &[usize],
    ) -> std::io::Result<usize> {
        static SAVES: AtomicU64 = AtomicU64::new(0);
        let mut order = self.load(erofs, chunk_size, chunks);
        let fitting: Vec<usize> = learned.iter().copied().filter(|c| *c < chunks).collect();
        merge(&mut order, &fitting);
        // The directory may have been removed to forget every list.
        fs::create_dir_all(&self.dir)?;
        let path = self.path(erofs, chunk_size);
        // Two layers may share one EROFS image (the same tar, compressed
        // twice): their saves never write the same temporary file.
        let tmp = path.with_extension(format!(
            "{}.{}.tmp",
            std::process::id(),
            SAVES.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = fs::File::create(&tmp)?;
        serde_json::to_writer(
            &mut f,
            &File {
                version: VERSION,
                chunk_size,
                chunks: order.clone(),
            },
        )?;
        f.flush()?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(order.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn lists_merge_over_runs_keeping_first_reads_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(s.load(E, 4096, 10).is_empty(), "nothing learned yet");
        assert_eq!(s.save(E, 4096, 10, &[5, 6, 0, 7]).unwrap(), 4);
        assert_eq!(s.save(E, 4096, 10, &[9, 0, 3]).unwrap(), 6);
        assert_eq!(s.load(E, 4096, 10), [5, 6, 0, 7, 9, 3]);
        // Another chunk size: not this list, and a list of its own.
        assert!(s.load(E, 8192, 10).is_empty());
        s.save(E, 8192, 10, &[1]).unwrap();
        assert_eq!(s.load(E, 4096, 10), [5, 6, 0, 7, 9, 3]);
        assert_eq!(s.load(E, 8192, 10), [1]);
        // The reader sees what the writer saved.
        assert_eq!(Store::reader(dir.path()).load(E, 4096, 10).len(), 6);
        // A list unused for longer than UNUSED_FOR goes at the next start;
        // one used since stays.
        let old = std::time::SystemTime::now() - UNUSED_FOR - std::time::Duration::from_secs(60);
        let set = |p: &Path, t| {
            fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap()
        };
        s.save(E, 4096, 10, &[1]).unwrap();
        set(&s.path(E, 4096), old);
        set(&s.path(E, 8192), old);
        assert_eq!(s.load(E, 8192, 10), [1], "used: touched");
        let other = dir.path().join("prefetch").join("notes.txt");
        fs::write(&other, "not a list").unwrap();
        set(&other, old);
        let s = Store::open(dir.path()).unwrap();
        assert!(s.path(E, 8192).exists());
        assert!(!s.path(E, 4096).exists(), "unused for too long");
        assert!(other.exists(), "only lists are pruned");
        // Removing the directory forgets every list; saving goes on.
        fs::remove_dir_all(dir.path().join("prefetch")).unwrap();
        assert!(s.load(E, 4096, 10).is_empty());
        assert_eq!(s.save(E, 4096, 10, &[4]).unwrap(), 1);
    }

    #[test]
    fn a_list_that_does_not_fit_the_layer_is_ignored_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.save(E, 4096, 10, &[1, 9]).unwrap();
        assert!(s.load(E, 4096, 5).is_empty(), "chunk 9 of 5");
        fs::write(s.path(E, 4096), b"{not json").unwrap();
        assert!(s.load(E, 4096, 10).is_empty());
        // Saving over it starts a fresh list.
        assert_eq!(s.save(E, 4096, 10, &[2]).unwrap(), 1);
        assert_eq!(s.load(E, 4096, 10), [2]);
    }

    #[test]
    fn shared_documents_merge_per_image_and_bad_ones_are_refused() {
        let mut doc = Shared::new();
        doc.merge(E, 65536, &[3, 4, 3]);
        doc.merge(E, 65536, &[1, 4]);
        doc.merge(E, 4096, &[]);
        assert_eq!(doc.list(E, 65536), Some(&[3, 4, 1][..]));
        assert_eq!(doc.list(E, 4096), None, "an empty list is not added");
        let bytes = serde_json::to_vec(&doc).unwrap();
        assert_eq!(Shared::parse(&bytes, "t").unwrap(), doc);
        assert_eq!(misfit(&[3, 4, 1], 5), None);
        assert_eq!(misfit(&[3, 9], 5).unwrap(), "chunk 9 of a layer of 5");

        for bad in [
            r#"{"version":2,"lists":[]}"#.to_string(),
            r#"{"version":1,"lists":[{"erofs":"sha256:zz","chunk_size":4096,"chunks":[]}]}"#
                .to_string(),
            format!(r#"{{"version":1,"lists":[{{"erofs":"{E}","chunk_size":100,"chunks":[]}}]}}"#),
            r#"{"version":1,"lists":[],"extra":1}"#.to_string(),
        ] {
            assert!(Shared::parse(bad.as_bytes(), "t").is_err(), "{bad}");
        }
        // Against an index: only its images, in its chunk size, without
        // repeats, cut to MAX_AHEAD; a misfit is left out.
        let layer = |erofs: &str, chunks: usize| crate::index::IndexLayer {
            layer: E.into(),
            diff_id: E.into(),
            erofs: erofs.into(),
            size: chunks as u64 * 4096,
            data_end: 4096,
            chunks: vec!["0".repeat(64); chunks],
            map: None,
            blocks: None,
        };
        let (f, g, h) = (
            format!("sha256:{}", "f".repeat(64)),
            format!("sha256:{}", "9".repeat(64)),
            format!("sha256:{}", "8".repeat(64)),
        );
        let index = crate::index::Index {
            version: crate::index::VERSION,
            chunk_size: 4096,
            layers: vec![layer(E, 20_000), layer(&f, 4), layer(&g, 4)],
        };
        let mut doc = Shared::new();
        let long: Vec<usize> = (0..20_000).rev().chain(0..5).collect();
        doc.merge(E, 4096, &long);
        doc.lists[0].chunks.push(7); // a repeat, as a hostile document may
        doc.merge(&f, 4096, &[2, 9]); // chunk 9 of 4
        doc.merge(&g, 8192, &[1]); // another chunk size
        doc.merge(&h, 4096, &[1]); // not in the index
        // Learned checkpoints go with the list of their layer blob.
        let points = |layer: &str| PointsRef {
            layer: layer.into(),
            digest: h.clone(),
            size: 100,
            eager: 50,
        };
        doc.points = vec![points(&g), points(E)];
        let fit = doc.for_index(&index, "t");
        assert_eq!(fit.len(), 1, "{:?}", fit.keys());
        let e = &fit[E];
        assert_eq!(e.chunks.len(), (MAX_AHEAD / 4096) as usize);
        assert_eq!(e.chunks[..2], [19_999, 19_998]);
        assert_eq!(e.points, Some(points(E)));
        doc.cut();
        assert_eq!(doc.lists[0].chunks.len(), (MAX_AHEAD / 4096) as usize);

        // An artifact layer is learned checkpoints only with its media
        // type, a layer digest and a sane eager length.
        let ann = |layer: &str, eager: &str| {
            std::collections::HashMap::from([
                (POINTS_LAYER.to_string(), layer.to_string()),
                (POINTS_EAGER.to_string(), eager.to_string()),
            ])
        };
        assert_eq!(
            PointsRef::of(POINTS_TYPE, &h, 100, &ann(E, "50")).unwrap(),
            Some(points(E))
        );
        assert_eq!(
            PointsRef::of("application/octet-stream", &h, 100, &ann(E, "50")).unwrap(),
            None
        );
        for (layer, eager, size) in [
            ("sha256:zz", "50", 100),
            (E, "500", 100),
            (E, "x", 100),
            (E, "50", -1),
        ] {
            assert!(
                PointsRef::of(POINTS_TYPE, &h, size, &ann(layer, eager)).is_err(),
                "{layer} {eager} {size}"
            );
        }
        assert!(PointsRef::of(POINTS_TYPE, &h, 100, &Default::default()).is_err());

        let huge = vec![b' '; MAX_DOCUMENT as usize + 1];
        assert!(
            Shared::parse(&huge, "t")
                .unwrap_err()
                .to_string()
                .contains("more than")
        );
    }
}
