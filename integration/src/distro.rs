//! A real distribution image for benchmarks: Debian 12 trimmed the way the
//! `-slim` images are, Python 3 with a few libraries from Debian's own
//! packages, and a small app on top, in gzip layers. It is what users run
//! (a language runtime, thousands of small files, compressed layers), as
//! opposed to the synthetic shapes of [`crate::image`] that flatter or
//! stress one path.
//!
//! The trees come from Debian's mirror through `debootstrap` and `apt-get`
//! in a chroot, once: the layer tars are cached (see [`cache_dir`]) and
//! reused by every later run. The Python layer is the difference between
//! the tree after `apt-get install` and the base, computed here the way
//! `docker build` commits a step: new and changed paths with their parent
//! directories, and a whiteout for each removed path. The base keeps the
//! device nodes debootstrap makes in `/dev`, as debootstrap-made images do.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::image::{Compression, ImageSpec, Layer, RunConfig};

/// The Debian release the image is built from.
pub const SUITE: &str = "bookworm";

/// Debian packages of the Python layer.
pub const PACKAGES: &[&str] = &[
    "python3",
    "python3-yaml",
    "python3-requests",
    "python3-jinja2",
];

/// Bump when the recipe changes, so cached trees are built again.
const RECIPE: u32 = 2;

/// What the app does: import a web client, a template engine, YAML and a
/// good part of the standard library, then render and print `ready`.
pub const APP: &str = r#"import asyncio, csv, decimal, email.mime.text, http.server, json
import logging, sqlite3, ssl, subprocess, xml.etree.ElementTree as ET
import jinja2, requests, yaml

config = yaml.safe_load("name: hyperbox\nitems: [1, 2, 3]\n")
page = jinja2.Template("{{ name }}: {{ items|sum }}").render(**config)
assert page == "hyperbox: 6", page
assert requests.Request("GET", "http://example.invalid/").prepare().url
print("ready")
"#;

/// Errors of building the image's trees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command failed.
    #[error("{what}: {detail}")]
    Command {
        /// The command line.
        what: String,
        /// Its exit status and the end of its output.
        detail: String,
    },
    /// A file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, Error>;

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Error {
    let what = what.to_string();
    move |source| Error::Io { what, source }
}

/// Where built trees are kept between runs:
/// `$HYPERBOX_BENCH_IMAGE_CACHE`, else `/var/cache/hyperbox/bench-images`
/// (a variable of its own: `HYPERBOX_BENCH_IMAGES` names the bench's
/// images, `python` or `files`, not a directory).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HYPERBOX_BENCH_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/hyperbox/bench-images"))
}

/// The two layer archives of the Debian + Python image and the paths the
/// Python step removed from the base.
#[derive(Debug, Clone)]
pub struct PythonTrees {
    /// Debian minbase, slimmed.
    pub base: PathBuf,
    /// What installing [`PACKAGES`] added or changed.
    pub python: PathBuf,
    /// Paths (relative) the Python step removed.
    pub removed: Vec<String>,
}

impl PythonTrees {
    /// The image: base, Python, and `/app/main.py` ([`APP`]) run by
    /// `python3`, every layer gzip'd at the usual level.
    pub fn image(&self) -> ImageSpec {
        let mut python = Layer::new(Compression::GzipDefault).tar_file(&self.python);
        for path in &self.removed {
            python = python.whiteout(path);
        }
        let app =
            Layer::new(Compression::GzipDefault)
                .dir("app", 0o755)
                .file("app/main.py", APP, 0o644);
        ImageSpec {
            layers: vec![
                Layer::new(Compression::GzipDefault).tar_file(&self.base),
                python,
                app,
            ],
            run: RunConfig {
                cmd: vec!["python3".into(), "/app/main.py".into()],
                env: vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                    "LANG=C.UTF-8".into(),
                ],
                working_dir: "/app".into(),
                ..Default::default()
            },
            with_index: true,
        }
    }
}

/// The Debian + Python trees, built into [`cache_dir`] on first use (a few
/// minutes: debootstrap and apt-get from the mirror in
/// `$HYPERBOX_DEBIAN_MIRROR`, default `http://deb.debian.org/debian`).
pub fn python_trees() -> Result<PythonTrees> {
    let dir = cache_dir().join(format!("debian-{SUITE}-python-r{RECIPE}"));
    let trees = PythonTrees {
        base: dir.join("base.tar"),
        python: dir.join("python.tar"),
        removed: Vec::new(),
    };
    let removed_list = dir.join("removed.txt");
    if !dir.join("done").exists() {
        build(&dir)?;
    }
    let removed = fs::read_to_string(&removed_list).map_err(io_err(removed_list.display()))?;
    Ok(PythonTrees {
        removed: removed.lines().map(str::to_string).collect(),
        ..trees
    })
}

fn build(dir: &Path) -> Result<()> {
    let work = dir.with_extension("tmp");
    if work.exists() {
        fs::remove_dir_all(&work).map_err(io_err(format!("clear {}", work.display())))?;
    }
    fs::create_dir_all(&work).map_err(io_err(work.display()))?;
    let base = work.join("base");
    let full = work.join("full");
    let mirror = std::env::var("HYPERBOX_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    run(Command::new("debootstrap")
        .args(["--variant=minbase", SUITE])
        .arg(&base)
        .arg(&mirror))?;
    // What the slim images leave out, for the base and for every package
    // installed later.
    fs::write(
        base.join("etc/dpkg/dpkg.cfg.d/slim"),
        "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n\
         path-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n\
         path-exclude /usr/share/locale/*\npath-exclude /usr/share/lintian/*\n",
    )
    .map_err(io_err("write dpkg excludes"))?;
    run(Command::new("sh")
        .arg("-c")
        .arg(
            "set -e; cd \"$1\"; \
         find usr/share/doc -type f ! -name copyright -delete; \
         find usr/share/doc -type l -delete; \
         rm -rf usr/share/man/* usr/share/info/* usr/share/locale/* usr/share/lintian/*; \
         rm -rf var/lib/apt/lists/* var/cache/apt/*.bin var/cache/apt/archives/*.deb var/log/*",
        )
        .arg("slim")
        .arg(&base))?;
    run(Command::new("cp").args(["-a"]).arg(&base).arg(&full))?;
    let packages = PACKAGES.join(" ");
    run(Command::new("chroot").arg(&full).args([
        "/usr/bin/env",
        "-i",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND=noninteractive",
        "sh",
        "-c",
        &format!(
            "set -e; apt-get update -q; apt-get install -y -q --no-install-recommends {packages}; \
             apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*"
        ),
    ]))?;
    // debootstrap's /dev (console, null, ptmx, tty, ...) stays in the base
    // layer, as in images made with debootstrap: containerd's overlayfs
    // accepts them and so must every hyperbox path.
    let (changed, removed) = diff(&base, &full)?;
    let list = work.join("python.list");
    let mut text = String::new();
    for p in &changed {
        text.push_str(p);
        text.push('\n');
    }
    fs::write(&list, text).map_err(io_err(list.display()))?;
    tar(
        &full,
        &work.join("python.tar"),
        &["--no-recursion", "-T"],
        Some(&list),
    )?;
    let top: Vec<String> = {
        let mut names: Vec<String> = fs::read_dir(&base)
            .map_err(io_err(base.display()))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()
            .map_err(io_err(base.display()))?;
        names.sort();
        names
    };
    let top: Vec<&str> = top.iter().map(String::as_str).collect();
    tar(&base, &work.join("base.tar"), &top, None)?;
    fs::write(work.join("removed.txt"), removed.join("\n")).map_err(io_err("write removed.txt"))?;
    for tree in [&base, &full] {
        fs::remove_dir_all(tree).map_err(io_err(format!("remove {}", tree.display())))?;
    }
    fs::write(work.join("done"), format!("recipe {RECIPE}\n")).map_err(io_err("write stamp"))?;
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(io_err(dir.display()))?;
    }
    fs::rename(&work, dir).map_err(io_err(format!("rename to {}", dir.display())))
}

/// GNU tar of `args` (or of the list file after them) under `root`, one
/// 512-byte block per record so [`Layer::tar_file`] can strip its end.
fn tar(root: &Path, out: &Path, args: &[&str], list: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new("tar");
    cmd.args([
        "--create",
        "--blocking-factor=1",
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--format=pax",
    ])
    .arg("--file")
    .arg(out)
    .arg("-C")
    .arg(root);
    // Options before names: -T takes the list file as its argument.
    cmd.args(args);
    if let Some(list) = list {
        cmd.arg(list);
    }
    run(&mut cmd)
}

fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let out = cmd.output().map_err(io_err(&what))?;
    if out.status.success() {
        return Ok(());
    }
    let tail = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        s.chars()
            .rev()
            .take(2000)
            .collect::<String>()
            .chars()
            .rev()
            .collect::<String>()
    };
    Err(Error::Command {
        what,
        detail: format!("{}\n{}{}", out.status, tail(&out.stdout), tail(&out.stderr)),
    })
}

/// One path's identity for the diff: what `cp -a` preserves and a package
/// install changes.
#[derive(PartialEq, Eq)]
struct Stamp {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    rdev: u64,
    link: Option<PathBuf>,
}

fn stamp(path: &Path) -> Result<Stamp> {
    let m = fs::symlink_metadata(path).map_err(io_err(path.display()))?;
    let link = if m.file_type().is_symlink() {
        Some(fs::read_link(path).map_err(io_err(path.display()))?)
    } else {
        None
    };
    Ok(Stamp {
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        // A directory's size follows its entries, not its content.
        size: if m.is_dir() { 0 } else { m.size() },
        mtime: if m.is_dir() {
            (0, 0)
        } else {
            (m.mtime(), m.mtime_nsec())
        },
        rdev: m.rdev(),
        link,
    })
}

/// Paths of `full` that are new or changed against `base` (with every
/// parent directory, sorted so parents come first), and paths of `base`
/// gone from `full` (not those under a removed directory).
fn diff(base: &Path, full: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let mut changed = BTreeSet::new();
    walk(full, Path::new(""), &mut |rel| {
        let b = base.join(rel);
        let new = match fs::symlink_metadata(&b) {
            Ok(_) => stamp(&full.join(rel))? != stamp(&b)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(io_err(b.display())(e)),
        };
        if new {
            let mut p = rel.to_path_buf();
            changed.insert(p.clone());
            while p.pop() && !p.as_os_str().is_empty() {
                changed.insert(p.clone());
            }
        }
        Ok(true)
    })?;
    let mut removed = Vec::new();
    walk(base, Path::new(""), &mut |rel| {
        if fs::symlink_metadata(full.join(rel)).is_err() {
            removed.push(rel.to_string_lossy().into_owned());
            return Ok(false);
        }
        Ok(true)
    })?;
    // BTreeSet of paths orders by components: a directory before its
    // entries, as tar needs.
    Ok((
        changed
            .into_iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        removed,
    ))
}

/// Calls `f` for each path under `root/rel`, depth first; `f` returning
/// false skips a directory's entries.
fn walk(root: &Path, rel: &Path, f: &mut dyn FnMut(&Path) -> Result<bool>) -> Result<()> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .map_err(io_err(dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .map_err(io_err(dir.display()))?;
    entries.sort();
    for name in entries {
        let rel = rel.join(name);
        let descend = f(&rel)?;
        let is_dir = fs::symlink_metadata(root.join(&rel))
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if descend && is_dir {
            walk(root, &rel, f)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_lists_new_and_changed_paths_with_parents_and_removed_ones() {
        let t = tempfile::tempdir().unwrap();
        let (base, full) = (t.path().join("base"), t.path().join("full"));
        for d in [&base, &full] {
            fs::create_dir_all(d.join("usr/lib/keep")).unwrap();
            fs::create_dir_all(d.join("etc")).unwrap();
        }
        fs::create_dir_all(base.join("var/gone/deep")).unwrap();
        fs::write(base.join("etc/same"), "x").unwrap();
        fs::copy(base.join("etc/same"), full.join("etc/same")).unwrap();
        let same = fs::metadata(base.join("etc/same")).unwrap();
        let t0 = fs::FileTimes::new().set_modified(same.modified().unwrap());
        fs::File::options()
            .write(true)
            .open(full.join("etc/same"))
            .unwrap()
            .set_times(t0)
            .unwrap();
        fs::write(base.join("etc/status"), "old").unwrap();
        fs::write(full.join("etc/status"), "new, longer").unwrap();
        fs::write(full.join("usr/lib/keep/python3.11"), "py").unwrap();
        let (changed, removed) = diff(&base, &full).unwrap();
        assert_eq!(
            changed,
            [
                "etc",
                "etc/status",
                "usr",
                "usr/lib",
                "usr/lib/keep",
                "usr/lib/keep/python3.11"
            ]
        );
        assert_eq!(removed, ["var"]);
    }
}
