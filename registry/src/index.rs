//! The hyperbox index: a small OCI artifact next to an unmodified image
//! that lets a node mount the image's layers at once and fetch their bytes
//! on first access (docs/design.md §3, "remote, lazy").
//!
//! For each layer it names an EROFS image of that layer (pushed as a blob
//! of the same repository) and the SHA-256 of every fixed-size chunk of it,
//! so each chunk fetched with a Range request is verified before the kernel
//! sees it. The artifact is an OCI image manifest whose config is the
//! [`Index`] document, whose layers are the EROFS blobs (so registry
//! garbage collection keeps them) and whose `subject` is the image
//! manifest. Registries without the referrers API (docker-registry 2.8)
//! find it by the tag [`tag_for`] derives from the image manifest digest,
//! the scheme cosign uses for signatures.
//!
//! Version 4 adds, for layers with a map, a table of the SHA-256 of every
//! 4 KiB block of the EROFS image, pushed as a blob of its own: a chunk's
//! digest is then the digest of its blocks' digests, so a node verifies a
//! read's blocks alone with the few table entries beside them (fetched by
//! Range, checked against the chunk digest) instead of the whole chunk,
//! whose other bytes may lie far away in the layer's compressed stream.
//! The table is part of the index (registry storage), but a node fetches
//! only the entries its reads need.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::Error;

/// Media type of the [`Index`] document (the artifact's config).
pub const CONFIG_TYPE: &str = "application/vnd.hyperbox.index.v1+json";
/// Media type of an EROFS layer image blob.
pub const EROFS_TYPE: &str = "application/vnd.hyperbox.erofs.layer.v1";
/// Media type of a layer map blob (`hyperbox_erofs::map`).
pub const MAP_TYPE: &str = "application/vnd.hyperbox.layer-map.v1";
/// Media type of a block digest table blob ([`BlockTable`]).
pub const BLOCKS_TYPE: &str = "application/vnd.hyperbox.block-digests.v1";
/// The index format version this build writes: 4, whose mapped layers may
/// carry a block digest table. Versions 2 and 3 are still read.
pub const VERSION: u32 = 4;
/// The version of an index whose layers name maps but no block tables
/// (nodes from before version 4 read it).
pub const VERSION_MAPS: u32 = 3;
/// Bytes per block of a block digest table.
pub const BLOCK: u64 = 4096;
/// The most blocks one layer's table may have (1 GiB of EROFS image): a
/// node keeps a little state per block of a layer it serves lazily.
pub const MAX_BLOCKS: u64 = 1 << 18;
/// Prefixed to a chunk's block digests to make its digest, so a digest of
/// blocks is never taken for the digest of a chunk's own bytes.
const BLOCKS_TAG: &[u8] = b"hyperbox block digests v1\0";
/// The most bytes of a map's eager part a node fetches at Prepare (held
/// in memory while the layer fills): a layer of a million files has about
/// 100 MiB of metadata, a tenth of it once compressed.
pub const MAX_MAP_EAGER: u64 = 64 << 20;
/// Bytes per verified chunk, what a read that misses fetches at least,
/// unless the image is large: most files of a distro image are smaller
/// than 16 KiB. Indexes made with 64 KiB or 1 MiB chunks keep working; the
/// background fill asks for 1 MiB at a time whatever the chunk size.
pub const SMALL_CHUNK_SIZE: u64 = 16 << 10;
/// The most chunks `hb image index` gives an image: about 70 bytes of
/// document each (4.4 MiB in all, well under [`MAX_DOCUMENT`]), and a
/// node keeps a little state per chunk of a layer it serves lazily.
pub const MAX_CHUNKS: u64 = 64 << 10;
/// Index documents larger than this are not read.
pub const MAX_DOCUMENT: u64 = 8 << 20;

/// The chunk size `hb image index` uses for an image whose EROFS images
/// come to `total` bytes: [`SMALL_CHUNK_SIZE`], doubled until the image
/// has at most [`MAX_CHUNKS`] (up to 64 MiB).
pub fn chunk_size_for(total: u64) -> u64 {
    let mut cs = SMALL_CHUNK_SIZE;
    while total.div_ceil(cs) > MAX_CHUNKS && cs < 64 << 20 {
        cs *= 2;
    }
    cs
}

/// The index document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    /// Format version: 2. Version 1 had no diff_ids and is refused, so
    /// its layers are fetched whole (`hb image index` writes version 2).
    pub version: u32,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// One entry per image layer, bottom first.
    pub layers: Vec<IndexLayer>,
}

/// One layer's EROFS image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexLayer {
    /// The image layer's blob digest (as in the image manifest).
    pub layer: String,
    /// The layer's diff_id (the digest of its uncompressed tar), as the
    /// image config lists it: a node serves the EROFS image only under the
    /// chain id this diff_id gives, and checks it against the layer's own
    /// bytes once the image is complete.
    pub diff_id: String,
    /// The EROFS image blob's digest.
    pub erofs: String,
    /// Its size.
    pub size: u64,
    /// Where file data ends. The kernel reads `[0, 4096)` and
    /// `[data_end, size)` as metadata, without the events that make lazy
    /// reads possible, so those ranges are fetched before the mount.
    pub data_end: u64,
    /// Hex SHA-256 of each chunk, in order.
    pub chunks: Vec<String>,
    /// Version 3: where the EROFS image's bytes come from the layer blob
    /// itself (no EROFS blob is pushed). Absent: Range requests on the
    /// EROFS blob, as in version 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapRef>,
    /// Version 4: the table of its blocks' digests; `chunks` are then
    /// [`chunk_of_blocks`] of each chunk's blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<BlockTable>,
}

/// A block digest table blob: the 32-byte SHA-256 of each [`BLOCK`] of
/// the EROFS image, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockTable {
    /// The table blob's digest.
    pub digest: String,
    /// Its size: 32 bytes per block.
    pub size: u64,
}

/// The SHA-256 of each [`BLOCK`] of `bytes` (the last may be short).
pub fn block_digests(bytes: &[u8]) -> Vec<[u8; 32]> {
    use sha2::Digest as _;
    bytes
        .chunks(BLOCK as usize)
        .map(|b| sha2::Sha256::digest(b).into())
        .collect()
}

/// The digest of a chunk whose blocks have these digests (hex).
pub fn chunk_of_blocks(blocks: &[[u8; 32]]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(BLOCKS_TAG);
    for b in blocks {
        h.update(b);
    }
    hex::encode(h.finalize())
}

impl IndexLayer {
    /// What a node verifies, fetches at least and tracks as present: a
    /// block under a block table, a chunk of `chunk_size` otherwise.
    pub fn unit(&self, chunk_size: u64) -> u64 {
        if self.blocks.is_some() {
            BLOCK
        } else {
            chunk_size
        }
    }

    /// How many units the EROFS image is.
    pub fn units(&self, chunk_size: u64) -> usize {
        self.size.div_ceil(self.unit(chunk_size)) as usize
    }
}

/// A layer map blob (`hyperbox_erofs::map::LayerMap`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapRef {
    /// The map blob's digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// The length of its eager part (fetched at Prepare); windows follow.
    pub eager: u64,
}

/// The tag the index of the image with manifest `manifest` is pushed under.
pub fn tag_for(manifest: &Digest) -> String {
    format!("sha256-{}.hyperbox", manifest.hex())
}

impl Index {
    /// Parses and checks an index document.
    pub fn parse(bytes: &[u8], what: &str) -> Result<Index, Error> {
        let bad = |why: String| Error::Manifest {
            reference: what.into(),
            why,
        };
        let ix: Index =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("hyperbox index: {e}")))?;
        if !(2..=VERSION).contains(&ix.version) {
            return Err(bad(format!(
                "hyperbox index version {} is not one of 2 to {VERSION} (run `hb image index` again)",
                ix.version
            )));
        }
        if ix.chunk_size < 4096 || ix.chunk_size > 64 << 20 || !ix.chunk_size.is_multiple_of(4096) {
            return Err(bad(format!(
                "chunk size {} is not a multiple of 4 KiB up to 64 MiB",
                ix.chunk_size
            )));
        }
        for l in &ix.layers {
            Digest::parse(&l.layer)?;
            Digest::parse(&l.erofs)?;
            Digest::parse(&l.diff_id)?;
            if l.data_end < 4096 || l.data_end > l.size {
                return Err(bad(format!(
                    "layer {}: data_end {} outside [4096, {}]",
                    l.layer, l.data_end, l.size
                )));
            }
            if let Some(m) = &l.map {
                Digest::parse(&m.digest)?;
                if ix.version < 3 || m.eager < 16 || m.eager > m.size || m.eager > MAX_MAP_EAGER {
                    return Err(bad(format!(
                        "layer {}: map of {} bytes with an eager part of {}",
                        l.layer, m.size, m.eager
                    )));
                }
            }
            if let Some(t) = &l.blocks {
                Digest::parse(&t.digest)?;
                let blocks = l.size.div_ceil(BLOCK);
                if ix.version < 4 || l.map.is_none() || blocks > MAX_BLOCKS || t.size != blocks * 32
                {
                    return Err(bad(format!(
                        "layer {}: block table of {} bytes for {} blocks (version {}, {})",
                        l.layer,
                        t.size,
                        blocks,
                        ix.version,
                        if l.map.is_some() { "mapped" } else { "no map" }
                    )));
                }
            }
            let want = l.size.div_ceil(ix.chunk_size);
            if l.chunks.len() as u64 != want {
                return Err(bad(format!(
                    "layer {}: {} chunk digests for {} bytes (want {want})",
                    l.layer,
                    l.chunks.len(),
                    l.size
                )));
            }
            if !l
                .chunks
                .iter()
                .all(|c| c.len() == 64 && c.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            {
                return Err(bad(format!("layer {}: malformed chunk digest", l.layer)));
            }
        }
        Ok(ix)
    }

    /// The entry for image layer `digest`.
    pub fn layer(&self, digest: &str) -> Option<&IndexLayer> {
        self.layers.iter().find(|l| l.layer == digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_grow_with_the_image_so_its_index_stays_readable() {
        assert_eq!(chunk_size_for(0), SMALL_CHUNK_SIZE);
        assert_eq!(chunk_size_for(1 << 30), SMALL_CHUNK_SIZE, "1 GiB: 65,536");
        assert_eq!(chunk_size_for((1 << 30) + 1), 32 << 10);
        assert_eq!(chunk_size_for(10 << 30), 256 << 10);
        assert_eq!(chunk_size_for(u64::MAX), 64 << 20, "bounded");
        for total in [1u64 << 20, 3 << 30, 700 << 30] {
            let n = total.div_ceil(chunk_size_for(total));
            // 64 hex digits, quotes and a comma per chunk.
            assert!(
                n <= MAX_CHUNKS && n * 67 < MAX_DOCUMENT,
                "{total}: {n} chunks"
            );
        }
    }

    fn ix(size: u64, chunks: usize) -> String {
        let c = format!("\"{}\"", "0".repeat(64));
        format!(
            r#"{{"version":2,"chunk_size":1048576,"layers":[{{"layer":"sha256:{a}","diff_id":"sha256:{a}","erofs":"sha256:{a}","size":{size},"data_end":4096,"chunks":[{}]}}]}}"#,
            vec![c; chunks].join(","),
            a = "a".repeat(64)
        )
    }

    #[test]
    fn chunk_lists_must_cover_the_image_exactly() {
        assert!(Index::parse(ix(3 << 20, 3).as_bytes(), "x").is_ok());
        assert!(Index::parse(ix((3 << 20) + 1, 4).as_bytes(), "x").is_ok());
        let e = Index::parse(ix(3 << 20, 2).as_bytes(), "x").unwrap_err();
        assert!(e.to_string().contains("2 chunk digests"), "{e}");
        assert!(Index::parse(b"{\"version\":1,\"chunk_size\":4096,\"layers\":[]}", "x").is_err());
    }

    #[test]
    fn maps_are_read_from_version_3_only_and_bounded() {
        let with_map = |version: u32, size: u64, eager: u64| {
            ix(4096, 1)
                .replace("\"version\":2", &format!("\"version\":{version}"))
                .replace(
                    "\"data_end\":4096,",
                    &format!(
                        "\"data_end\":4096,\"map\":{{\"digest\":\"sha256:{}\",\"size\":{size},\"eager\":{eager}}},",
                        "b".repeat(64)
                    ),
                )
        };
        let ok = Index::parse(with_map(3, 5000, 300).as_bytes(), "x").unwrap();
        assert_eq!(ok.layers[0].map.as_ref().unwrap().eager, 300);
        assert!(
            Index::parse(
                ix(4096, 1)
                    .replace("\"version\":2", "\"version\":3")
                    .as_bytes(),
                "x"
            )
            .is_ok()
        );
        for (v, size, eager) in [
            (2, 5000, 300),
            (3, 200, 300),
            (3, 5000, 8),
            (3, 1 << 40, MAX_MAP_EAGER + 1),
        ] {
            assert!(
                Index::parse(with_map(v, size, eager).as_bytes(), "x").is_err(),
                "version {v}, map of {size} with {eager} eager"
            );
        }
        assert!(
            Index::parse(
                ix(4096, 1)
                    .replace("\"version\":2", "\"version\":5")
                    .as_bytes(),
                "x"
            )
            .is_err()
        );
    }

    #[test]
    fn block_tables_are_read_from_version_4_mapped_layers_of_the_right_size() {
        // 10,000 bytes: three blocks, one 16 KiB chunk.
        let doc = |version: u32, map: bool, table: u64| {
            let map = if map {
                format!(
                    "\"map\":{{\"digest\":\"sha256:{}\",\"size\":5000,\"eager\":300}},",
                    "b".repeat(64)
                )
            } else {
                String::new()
            };
            format!(
                r#"{{"version":{version},"chunk_size":16384,"layers":[{{"layer":"sha256:{a}","diff_id":"sha256:{a}","erofs":"sha256:{a}","size":10000,"data_end":4096,{map}"blocks":{{"digest":"sha256:{c}","size":{table}}},"chunks":["{z}"]}}]}}"#,
                a = "a".repeat(64),
                c = "c".repeat(64),
                z = "0".repeat(64),
            )
        };
        let ok = Index::parse(doc(4, true, 96).as_bytes(), "x").unwrap();
        let l = &ok.layers[0];
        assert_eq!((l.unit(ok.chunk_size), l.units(ok.chunk_size)), (4096, 3));
        for (v, map, table) in [(3, true, 96), (4, false, 96), (4, true, 64), (4, true, 128)] {
            let e = Index::parse(doc(v, map, table).as_bytes(), "x").unwrap_err();
            assert!(
                e.to_string().contains("block table"),
                "{v} {map} {table}: {e}"
            );
        }
        // Without a table, units are chunks.
        let plain = Index::parse(ix(3 << 20, 3).as_bytes(), "x").unwrap();
        assert_eq!(plain.layers[0].units(plain.chunk_size), 3);
        // A chunk of blocks is not the digest of the digests' bytes alone.
        let d = [[7u8; 32], [9u8; 32]];
        use sha2::Digest as _;
        assert_ne!(
            chunk_of_blocks(&d),
            hex::encode(sha2::Sha256::digest(d.concat()))
        );
        assert_ne!(chunk_of_blocks(&d), chunk_of_blocks(&d[..1]));
    }

    #[test]
    fn tag_is_a_valid_tag() {
        let t = tag_for(&Digest::of(b"m"));
        assert!(t.len() <= 128 && crate::Reference::parse(&format!("h.example/r:{t}")).is_ok());
    }
}
