//! What a workload reads from its image, and what those files cost in the
//! image's compressed layers: the yardstick for lazy pulls' bytes (#19:
//! bytes fetched by the workload's exit against the compressed bytes of
//! the files it actually read, plus the index).
//!
//! The image is unpacked into a directory (whiteouts applied) and its
//! command run there under `strace`, chrooted; every regular file it
//! opened or executed (and each executable's ELF interpreter, which the
//! kernel reads without an `open`) counts whole. Each file's compressed
//! bytes are the layer blob's bytes from where its data begins in the
//! deflate stream to where it ends, in the topmost layer that holds it.
//! Only gzip and plain tar layers are measured.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::image::{BuiltImage, RunConfig, media};
use hyperbox_erofs::{deflate, learned, map, trim, zran};

/// The files a workload read and their cost.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    /// Regular files read, by path in the rootfs.
    pub files: Vec<String>,
    /// Their bytes.
    pub bytes: u64,
    /// Their bytes in the compressed layers.
    pub compressed: u64,
    /// The least a lazy reader fetches for them from the layers' own blobs.
    pub floor: Floor,
}

/// The least a reader fetches to serve the files read from the image's own
/// layer blobs, verifying exactly those bytes: for each cluster of them in
/// a gzip layer (reads less than [`learned::CLUSTER_GAP`] apart, as
/// hyperbox's learned checkpoints group them), the compressed bytes from
/// the deflate symbol before the cluster to the one that ends it, and the
/// window there trimmed to what the cluster's own references reach
/// ([`deflate::reach_exact`]), zstd-compressed as layer maps store
/// windows; in a plain tar, the files' bytes. What a lazy pull fetches
/// beyond it is the price of its design (verification in chunks, windows
/// that serve any read from their checkpoint); what #19's bytes target
/// allows beyond the files' compressed bytes is 20 %.
#[derive(Debug, Clone, Copy, Default)]
pub struct Floor {
    /// Clusters, one checkpoint each.
    pub clusters: usize,
    /// Compressed layer bytes from each cluster's checkpoint to its end.
    pub range: u64,
    /// The clusters' windows (with a block header where one starts inside
    /// a block), compressed.
    pub windows: u64,
}

impl Floor {
    /// Range and windows.
    pub fn total(&self) -> u64 {
        self.range + self.windows
    }
}

/// One file's data in a layer: its size and its compressed bytes.
#[derive(Debug, Clone, Copy)]
struct Cost {
    /// Where its data begins in the tar.
    at: u64,
    size: u64,
    compressed: u64,
}

/// Unpacks `image`, runs `run` in it under strace and prices what it read.
pub fn measure(image: &BuiltImage, run: &RunConfig) -> Result<Workload> {
    let root = tempfile::Builder::new()
        .prefix("hb-reads-")
        .tempdir()
        .context("temporary directory")?;
    // strace prints real paths: a root reached through a symlink would
    // match none of them.
    let dir = root.path().canonicalize().context("temporary directory")?;
    let costs: Vec<HashMap<String, Cost>> = image
        .layers
        .iter()
        .map(|l| costs(&l.blob.path, &l.blob.media_type))
        .collect::<Result<_>>()?;
    for (l, c) in image.layers.iter().zip(&costs) {
        unpack(&l.blob.path, &l.blob.media_type, &dir, c.keys())?;
    }
    let opened = opened(&dir, run)?;
    let mut read = Workload::default();
    // Each layer's tar ranges read, for the floor.
    let mut ranges: Vec<Vec<(u64, u64)>> = vec![Vec::new(); costs.len()];
    // Hard links to the same data count once.
    let mut priced = std::collections::HashSet::new();
    for path in opened {
        // The topmost layer holding it is where the lower dir came from;
        // none holds what the workload made itself.
        let Some((layer, cost)) = costs
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, c)| Some((i, c.get(&path)?)))
        else {
            continue;
        };
        if !priced.insert((layer, cost.at)) {
            continue;
        }
        read.bytes += cost.size;
        read.compressed += cost.compressed;
        read.files.push(path);
        ranges[layer].push((cost.at, cost.at + cost.size));
    }
    for (l, r) in image.layers.iter().zip(ranges) {
        let f = floor(&l.blob.path, &l.blob.media_type, r)
            .with_context(|| format!("the floor of layer {}", l.blob.digest))?;
        read.floor.clusters += f.clusters;
        read.floor.range += f.range;
        read.floor.windows += f.windows;
    }
    Ok(read)
}

/// [`Floor`] for one layer whose files read lie at tar `ranges`.
fn floor(blob: &Path, media_type: &str, ranges: Vec<(u64, u64)>) -> Result<Floor> {
    let clusters = learned::clusters(ranges.into_iter().filter(|(s, e)| e > s).collect());
    let mut out = Floor {
        clusters: clusters.len(),
        ..Floor::default()
    };
    if clusters.is_empty() {
        return Ok(out);
    }
    if media_type != media::LAYER_GZIP {
        out.range = clusters.iter().map(|(s, e)| e - s).sum();
        return Ok(out);
    }
    let file = std::fs::File::open(blob).with_context(|| format!("open {}", blob.display()))?;
    let starts = clusters.iter().map(|(s, _)| *s).collect();
    let mut ix = zran::Indexer::before(BufReader::new(&file), starts)?;
    std::io::copy(&mut ix, &mut std::io::sink()).context("inflate the layer")?;
    let boundaries = ix.into_points();
    // Windows as layer maps store them, in one context.
    let mut zstd = zstd::bulk::Compressor::new(map::ZSTD_LEVEL)?;
    // Clusters in one block (in order, they come together) read it once.
    let mut block: (Option<u64>, Vec<u8>) = (None, Vec::new());
    for (start, end) in clusters {
        let b = boundaries
            .iter()
            .rev()
            .find(|b| b.output <= start)
            .context("no block boundary before a read")?;
        if block.0 != Some(b.output) {
            block = (
                Some(b.output),
                trim::read_blob(&file, b.fetch_from(), 1 << 20)?,
            );
        }
        // The symbol just before the cluster, or its block's boundary.
        let (header, at) = match deflate::splice_before(b, &block.1, start) {
            Some(s) => ((s.header, s.header_bits), s.at),
            None => ((Vec::new(), 0), b.clone()),
        };
        let bytes = trim::read_blob(&file, at.fetch_from(), trim::read_for(end - at.output))?;
        let r = deflate::reach_exact((&header.0, header.1), &at, &bytes, end)
            .with_context(|| format!("decode tar bytes {start}-{end}"))?;
        out.range += r.input - at.fetch_from();
        let mut frame = header.0;
        frame.extend_from_slice(&r.window);
        out.windows += zstd.compress(&frame)?.len() as u64;
    }
    Ok(out)
}

/// Extracts one layer over `root`, then applies its whiteouts, found
/// among the layer's regular `files` (tar paths).
fn unpack<'a>(
    blob: &Path,
    media_type: &str,
    root: &Path,
    files: impl Iterator<Item = &'a String>,
) -> Result<()> {
    let mut tar = Command::new("tar");
    tar.arg("-x").arg("--numeric-owner").arg("-C").arg(root);
    if media_type == media::LAYER_GZIP {
        tar.arg("-z");
    }
    let out = tar.arg("-f").arg(blob).output().context("run tar")?;
    ensure!(
        out.status.success(),
        "tar -x {}: {}",
        blob.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    for path in files {
        let entry = root.join(path);
        let name = entry.file_name().unwrap_or_default().to_string_lossy();
        let Some(hidden) = name.strip_prefix(".wh.") else {
            continue;
        };
        ensure!(
            hidden != ".wh..opq",
            "opaque directories are not measured ({path})"
        );
        let target = entry.with_file_name(hidden);
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target)?,
            Ok(_) => std::fs::remove_file(&target)?,
            Err(_) => {}
        }
        std::fs::remove_file(&entry)?;
    }
    Ok(())
}

/// The regular files `run` opens or executes in `root`, by path inside it.
fn opened(root: &Path, run: &RunConfig) -> Result<Vec<String>> {
    let log = tempfile::NamedTempFile::new()?;
    let argv: Vec<&String> = run.entrypoint.iter().chain(&run.cmd).collect();
    ensure!(!argv.is_empty(), "the image runs nothing");
    let dir = if run.working_dir.is_empty() {
        "/"
    } else {
        &run.working_dir
    };
    let out = Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", "status=successful"])
        .args(["-e", "trace=chroot,execve,open,openat,openat2"])
        .arg("-o")
        .arg(log.path())
        .arg("--")
        // strace looks it up in the workload's environment.
        .arg(
            ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .context("chroot not found (coreutils)")?,
        )
        .arg(root)
        .args(["/bin/sh", "-c", "cd \"$0\" && exec \"$@\"", dir])
        .args(&argv)
        .env_clear()
        .envs(run.env.iter().filter_map(|kv| kv.split_once('=')))
        .output()
        .context("run strace (apt-get install strace)")?;
    ensure!(
        out.status.success(),
        "the workload failed under strace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(log.path())?;
    let mut seen = BTreeMap::new();
    // Only what happens after the chroot: before it, chroot(1) itself
    // loads the host's libraries.
    let mut inside = false;
    let prefix = format!("{}/", root.display());
    for line in text.lines() {
        if line.contains(" chroot(") {
            inside = true;
            continue;
        }
        // Files opened to write are not reads.
        if !inside || line.contains("O_WRONLY") {
            continue;
        }
        let found = if line.contains(" execve(") {
            // A relative path is the working directory's (the shell went
            // there first).
            quoted(line).and_then(|p| {
                let p = if p.starts_with('/') {
                    p
                } else {
                    format!("{dir}/{p}")
                };
                resolve(root, &p)
            })
        } else {
            // `-y` prints the opened file's real path after the fd.
            line.rsplit_once("= ")
                .and_then(|(_, r)| r.split_once('<'))
                .and_then(|(_, p)| p.strip_suffix('>'))
                .and_then(|p| p.strip_prefix(&prefix))
                .map(|p| root.join(p))
        };
        let Some(host) = found else { continue };
        if !std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_file()) {
            continue;
        }
        // The kernel reads an executable's interpreters without an open:
        // a script's `#!` one, and an ELF file's loader.
        if line.contains(" execve(") {
            let mut exe = host.clone();
            for _ in 0..4 {
                let Some(next) = interpreter(&exe).and_then(|i| resolve(root, &i)) else {
                    break;
                };
                if !std::fs::symlink_metadata(&next).is_ok_and(|m| m.is_file()) {
                    break;
                }
                seen.entry(inner(root, &next)).or_insert(());
                exe = next;
            }
        }
        seen.entry(inner(root, &host)).or_insert(());
    }
    Ok(seen.into_keys().collect())
}

/// The first quoted string of a strace line.
fn quoted(line: &str) -> Option<String> {
    let (_, rest) = line.split_once('"')?;
    Some(rest.split_once('"')?.0.to_string())
}

/// `host` (under `root`) as a path inside it, without the leading `/`.
fn inner(root: &Path, host: &Path) -> String {
    host.strip_prefix(root)
        .unwrap_or(host)
        .to_string_lossy()
        .into_owned()
}

/// `path` inside `root` with symlinks followed inside it (absolute ones
/// from `root`), as a host path.
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let mut todo: Vec<String> = path.split('/').rev().map(str::to_string).collect();
    let mut at = root.to_path_buf();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "" | "." => continue,
            ".." => {
                if at != root {
                    at.pop();
                }
                continue;
            }
            _ => {}
        }
        let next = at.join(&c);
        match std::fs::read_link(&next) {
            Ok(target) => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                if target.is_absolute() {
                    at = root.to_path_buf();
                }
                for part in target.components().rev() {
                    if let Component::Normal(p) = part {
                        todo.push(p.to_string_lossy().into_owned());
                    } else if part == Component::ParentDir {
                        todo.push("..".into());
                    }
                }
            }
            Err(_) => at = next,
        }
    }
    Some(at)
}

/// The interpreter an executable names: a script's `#!` line, an ELF
/// file's `PT_INTERP`; `None` for neither.
fn interpreter(file: &Path) -> Option<String> {
    let data = std::fs::read(file).ok()?;
    if let Some(line) = data.strip_prefix(b"#!") {
        let line = &line[..line.iter().position(|b| *b == b'\n').unwrap_or(line.len())];
        let line = String::from_utf8_lossy(line);
        return line.split_whitespace().next().map(str::to_string);
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?));
    // 64-bit little-endian ELF only: the machines measured.
    if data.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20)? as usize, u16_at(0x36)?, u16_at(0x38)?);
    for k in 0..usize::from(phnum) {
        let ph = phoff + k * usize::from(phentsize);
        if data.get(ph..ph + 4)? == [3, 0, 0, 0] {
            let (off, size) = (u64_at(ph + 8)? as usize, u64_at(ph + 32)? as usize);
            let s = data.get(off..off + size)?;
            return Some(
                String::from_utf8_lossy(s)
                    .trim_end_matches('\0')
                    .to_string(),
            );
        }
    }
    None
}

/// Each regular file of a layer (hard links by their target's data): its
/// size and compressed bytes.
fn costs(blob: &Path, media_type: &str) -> Result<HashMap<String, Cost>> {
    let gzip = match media_type {
        media::LAYER_GZIP => true,
        media::LAYER_TAR => false,
        other => bail!("layers of type {other} are not measured"),
    };
    // First the entries and where their data lies in the tar.
    let file = std::fs::File::open(blob).with_context(|| format!("open {}", blob.display()))?;
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut archive = tar::Archive::new(reader);
    let mut data: HashMap<String, (u64, u64)> = HashMap::new();
    let mut links: Vec<(String, String)> = Vec::new();
    for e in archive.entries().context("read the layer's tar")? {
        let e = e?;
        let path = clean(&e.path()?.to_string_lossy());
        match e.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                data.insert(path, (e.raw_file_position(), e.size()));
            }
            tar::EntryType::Link => {
                if let Some(t) = e.link_name()? {
                    links.push((path, clean(&t.to_string_lossy())));
                }
            }
            _ => {}
        }
    }
    for (path, target) in links {
        if let Some(d) = data.get(&target).copied() {
            data.insert(path, d);
        }
    }
    // Then the compressed offset at each data boundary.
    let mut bounds: Vec<u64> = data
        .values()
        .flat_map(|(at, size)| [*at, at + size])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let at = if gzip {
        compressed_offsets(blob, &bounds)?
    } else {
        bounds.iter().map(|b| (*b, *b)).collect()
    };
    Ok(data
        .into_iter()
        .map(|(path, (start, size))| {
            let c = at[&(start + size)].saturating_sub(at[&start]);
            (
                path,
                Cost {
                    at: start,
                    size,
                    compressed: c,
                },
            )
        })
        .collect())
}

/// A tar path as `inner` writes them: no leading `./` or `/`.
fn clean(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

/// For each of `bounds` (sorted tar offsets), the offset in the gzip blob
/// where inflating has made exactly that many bytes: the deflate stream's
/// bytes taken by then, after the gzip header (one member only).
fn compressed_offsets(blob: &Path, bounds: &[u64]) -> Result<HashMap<u64, u64>> {
    let mut r = BufReader::with_capacity(1 << 20, std::fs::File::open(blob)?);
    let header = gzip_header(&mut r)?;
    // The inflater counts as taken all the input it is handed: handed a
    // little at a time, its count is each boundary's place within that.
    let mut d = flate2::bufread::DeflateDecoder::new(BufReader::with_capacity(FED, r));
    let mut out = HashMap::new();
    let mut made = 0u64;
    let mut sink = vec![0u8; 1 << 16];
    for &b in bounds {
        while made < b {
            let want = ((b - made) as usize).min(sink.len());
            let n = d.read(&mut sink[..want])?;
            ensure!(n > 0, "the layer ends before tar offset {b}");
            made += n as u64;
        }
        out.insert(b, header + d.total_in());
    }
    Ok(out)
}

/// Input bytes handed to the inflater at a time: the precision of
/// [`compressed_offsets`].
const FED: usize = 64;

/// Skips a gzip member's header; returns its length.
fn gzip_header(r: &mut impl BufRead) -> Result<u64> {
    let mut fixed = [0u8; 10];
    r.read_exact(&mut fixed)?;
    ensure!(fixed[..3] == [0x1f, 0x8b, 8], "not a gzip blob");
    let flags = fixed[3];
    let mut len = 10u64;
    if flags & 4 != 0 {
        let mut x = [0u8; 2];
        r.read_exact(&mut x)?;
        let n = u16::from_le_bytes(x);
        std::io::copy(&mut r.take(n.into()), &mut std::io::sink())?;
        len += 2 + u64::from(n);
    }
    for bit in [8u8, 16] {
        if flags & bit != 0 {
            let mut s = Vec::new();
            len += r.read_until(0, &mut s)? as u64;
        }
    }
    if flags & 2 != 0 {
        r.read_exact(&mut [0u8; 2])?;
        len += 2;
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Compression, ImageSpec, Layer};
    use crate::prereq::{self, Prereq};

    /// Words, so the text compresses as source files do.
    fn text(seed: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut x = seed;
        while out.len() < len {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let word = [
                "alpha", "beta", "gamma", "delta", "import", "return", "self",
            ][(x >> 33) as usize % 7];
            out.extend_from_slice(word.as_bytes());
            out.push(if (x >> 20).is_multiple_of(9) {
                b'\n'
            } else {
                b' '
            });
        }
        out.truncate(len);
        out
    }

    #[test]
    fn the_floor_is_each_clusters_own_bytes_and_the_window_it_refers_to() {
        let (mut gz, mut plain) = (
            Layer::new(Compression::GzipDefault),
            Layer::new(Compression::None),
        );
        for i in 0..40 {
            let t = text(100 + i, 20_000);
            gz = gz.file(&format!("f{i:02}"), t.clone(), 0o644);
            plain = plain.file(&format!("f{i:02}"), t, 0o644);
        }
        let dir = tempfile::tempdir().unwrap();
        let gz = gz.write_blob(dir.path()).unwrap().blob;
        let plain = plain.write_blob(dir.path()).unwrap().blob;
        let c = costs(&gz.path, &gz.media_type).unwrap();
        let at = |n: &str| (c[n].at, c[n].at + c[n].size);
        let floor_of = |r: Vec<(u64, u64)>| floor(&gz.path, &gz.media_type, r).unwrap();

        // One file in the middle: its own compressed bytes, give or take
        // the symbols at its ends (and the precision of its price), and a
        // part of the window before it.
        let one = floor_of(vec![at("f20")]);
        assert_eq!(one.clusters, 1);
        let price = c["f20"].compressed;
        assert!(
            one.range + 2 * FED as u64 >= price && one.range <= price + 1024,
            "{one:?} for a file of {price} compressed bytes"
        );
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&gz.path).unwrap())
            .read_to_end(&mut tar)
            .unwrap();
        let start = c["f20"].at as usize;
        let whole = zstd::encode_all(&tar[start - (32 << 10)..start], 19)
            .unwrap()
            .len() as u64;
        assert!(
            one.windows > 0 && one.windows < whole,
            "{one:?}: the whole window is {whole} bytes compressed"
        );

        // Neighbours share a checkpoint; files far apart need one each.
        let near = floor_of(vec![at("f21"), at("f20")]);
        assert_eq!(near.clusters, 1);
        assert!(near.range <= price + c["f21"].compressed + 1024, "{near:?}");
        let far = floor_of(vec![at("f05"), at("f30")]);
        assert_eq!(far.clusters, 2);
        assert!(far.windows > one.windows, "{far:?}");
        assert_eq!(floor_of(Vec::new()).total(), 0);

        // A plain tar's floor is the files' bytes.
        let p = costs(&plain.path, &plain.media_type).unwrap();
        let f = floor(
            &plain.path,
            &plain.media_type,
            vec![(p["f20"].at, p["f20"].at + p["f20"].size)],
        )
        .unwrap();
        assert_eq!((f.range, f.windows), (20_000, 0));
    }

    #[test]
    fn what_a_workload_reads_is_priced_in_its_topmost_layer() {
        if !prereq::require(
            "reads::measure",
            &[Prereq::Root, Prereq::Busybox, Prereq::Strace],
        ) {
            return;
        }
        // `read` is in both layers and whited-out `gone` in the upper;
        // `unread` is never opened.
        let lower = Layer::busybox(Compression::GzipDefault)
            .unwrap()
            .file("data/read", text(1, 300_000), 0o644)
            .file("data/unread", text(2, 300_000), 0o644)
            .file("data/gone", text(3, 1000), 0o644);
        let upper = Layer::new(Compression::GzipDefault)
            .file("data/read", text(4, 100_000), 0o644)
            .whiteout("data/gone");
        let mut spec = ImageSpec::busybox(&[
            "sh",
            "-c",
            "cat data/read >/dev/null; cat data/gone 2>/dev/null; true",
        ])
        .unwrap();
        spec.layers = vec![lower, upper];
        spec.run.working_dir = "/".into();
        let dir = tempfile::tempdir().unwrap();
        let built = spec.build(dir.path()).unwrap();
        let read = measure(&built, &spec.run).unwrap();
        assert!(
            read.files.iter().any(|f| f == "data/read"),
            "{:?}",
            read.files
        );
        assert!(
            read.files.iter().any(|f| f == "bin/busybox"),
            "{:?}",
            read.files
        );
        assert!(
            !read
                .files
                .iter()
                .any(|f| f.starts_with("data/") && f != "data/read")
        );
        let busybox = std::fs::metadata(crate::image::BUSYBOX).unwrap().len();
        // The upper layer's copy, not the lower's three times larger one.
        assert_eq!(read.bytes, busybox + 100_000);
        // Words compress; busybox about by half.
        assert!(
            read.compressed > 1000 && read.compressed < read.bytes * 3 / 4,
            "{read:?}"
        );
        let gz = |b: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            std::io::Write::write_all(&mut e, b).unwrap();
            e.finish().unwrap().len() as u64
        };
        // The text's share is about what compressing it alone gives.
        let alone = gz(&text(4, 100_000));
        let bb = gz(&std::fs::read(crate::image::BUSYBOX).unwrap());
        let whole = alone + bb;
        assert!(
            read.compressed * 10 > whole * 8 && read.compressed * 10 < whole * 12,
            "{} against {whole} compressed alone",
            read.compressed
        );
        // Two clusters (busybox below, the text above), each at least its
        // own compressed bytes.
        assert_eq!(read.floor.clusters, 2, "{:?}", read.floor);
        assert!(
            read.floor.range + 4 * FED as u64 >= read.compressed
                && read.floor.range < read.compressed + 4096,
            "{:?} for {} compressed bytes",
            read.floor,
            read.compressed
        );
    }
}
