//! containerd's own snapshotter test suite (`core/snapshots/testsuite` of
//! containerd v2, the conformance suite its built-in snapshotters pass) run
//! against hyperbox-snapshotter through containerd's proxy snapshotter
//! client, the gRPC path a `[proxy_plugins]` entry takes.
//!
//! The suite is Go. `integration/containerd-testsuite` is a small module of
//! ours that hands it a factory connected to the daemon's socket and runs the
//! cases one at a time, emptying the daemon between them. The test binary is
//! built once per version of that module and of Go, and cached with Go's
//! module and build caches under [`GO_CACHE`], so only a cold cache needs the
//! Go module proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hyperbox_integration::footprint::mounts_under;
use hyperbox_integration::prereq::{self, Prereq};
use hyperbox_integration::require;
use hyperbox_integration::snapshotter::SnapshotterDaemon;
use sha2::{Digest, Sha256};

/// A case expected to fail.
struct KnownFailure {
    /// The case's name in the suite.
    case: &'static str,
    /// Text its log must contain, so that it fails for this reason only.
    signature: &'static str,
    /// The reason, printed on every run.
    why: &'static str,
}

/// Cases expected to fail. Every one of them must fail, for its reason,
/// and no other case may: a fixed case has to leave this list.
const KNOWN_FAILURES: &[KnownFailure] = &[KnownFailure {
    case: "Rename",
    signature: "/dir2: invalid cross-device link",
    why: "renaming a directory of a lower layer fails with EXDEV, as on \
              containerd's own overlayfs and erofs snapshotters, which the \
              suite exempts from this step: overlayfs moves lower directories \
              only with redirect_dir, off on this kernel and in our mounts \
              because a redirect is an overlay xattr inside the layer that \
              diffs reading the upper directory do not follow",
}];

/// Where the Go toolchain's caches and the built suite live, outside any
/// clone so that every checkout and CI run on the machine shares them.
const GO_CACHE: &str = "/var/cache/hyperbox/go";

/// The Go test function in `integration/containerd-testsuite`; the suite's
/// cases are its subtests.
const GO_TEST: &str = "TestHyperboxSnapshotter";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_snapshotter_suite_passes() {
    require!(Prereq::Root);
    let Some(go) = go_or_skip() else {
        return;
    };
    let suite = suite_binary(&go);
    let snap = SnapshotterDaemon::start().await;
    let scratch = Scratch::new();

    let socket = snap.address();
    let tmp = scratch.0.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&suite)
            .args(["-test.v", "-test.parallel=1", "-test.count=1"])
            .arg("-test.timeout=20m")
            .env("HYPERBOX_SNAPSHOTTER_SOCKET", &socket)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", suite.display()))
    })
    .await
    .expect("suite runner");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = Report::parse(&stdout);
    println!("{}", report.summary(&containerd_version()));

    assert!(
        report.top.is_some_and(|o| o != Outcome::Skip),
        "the suite did not run to its end ({}); stdout:\n{}\nstderr:\n{}",
        out.status,
        tail(&stdout, 60),
        tail(&stderr, 60)
    );
    let unfinished: Vec<&String> = report
        .started
        .iter()
        .filter(|c| !report.cases.contains_key(*c))
        .collect();
    assert!(
        unfinished.is_empty() && !report.cases.is_empty(),
        "cases without an outcome: {unfinished:?}; stderr:\n{}",
        tail(&stderr, 60)
    );

    let known: BTreeMap<&str, &KnownFailure> = KNOWN_FAILURES.iter().map(|k| (k.case, k)).collect();
    for k in KNOWN_FAILURES {
        assert!(
            report.cases.contains_key(k.case),
            "KNOWN_FAILURES names {}, which the suite no longer has",
            k.case
        );
        println!("known failure {}: {}", k.case, k.why);
    }
    let mut wrong = Vec::new();
    for (case, outcome) in &report.cases {
        match (outcome, known.get(case.as_str())) {
            (Outcome::Fail, None) => {
                wrong.push(format!("{case} failed:\n{}", report.log_tail(case, 30)));
            }
            (Outcome::Fail, Some(k)) if !report.logged(case, k.signature) => {
                wrong.push(format!(
                    "{case} failed, but not with {:?} as KNOWN_FAILURES says:\n{}",
                    k.signature,
                    report.log_tail(case, 30)
                ));
            }
            (Outcome::Pass, Some(_)) => {
                wrong.push(format!("{case} passes now: remove it from KNOWN_FAILURES"))
            }
            (Outcome::Skip, _) => wrong.push(format!(
                "{case} was skipped (none of the suite's skips apply on Linux):\n{}",
                report.log_tail(case, 5)
            )),
            _ => {}
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));

    // Each case emptied the daemon; nothing the suite made may remain, on
    // the host or in the daemon.
    let left = snap.list(&[]).await.expect("walk after the suite");
    assert!(left.is_empty(), "snapshots left: {left:#?}");
    let on_disk = snapshot_dirs(&snap.root());
    assert!(on_disk.is_empty(), "snapshot directories left: {on_disk:?}");
    let mounts = mounts_under(snap.dir());
    assert!(mounts.is_empty(), "daemon mounts left: {mounts:?}");
    let leaks = scratch.leaks();
    assert!(leaks.is_empty(), "the suite left behind: {leaks:#?}");
    snap.finish();
}

/// How one case (or the whole Go test) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// What `go test -test.v` printed, case by case.
#[derive(Debug, Default)]
struct Report {
    /// The outcome of each case that reported one.
    cases: BTreeMap<String, Outcome>,
    /// Every case that started.
    started: BTreeSet<String>,
    /// The lines each case logged.
    logs: BTreeMap<String, Vec<String>>,
    /// The outcome of [`GO_TEST`] itself; `None` if it never ended (a
    /// panic or the timeout killed the binary).
    top: Option<Outcome>,
}

impl Report {
    fn parse(out: &str) -> Report {
        let mut r = Report::default();
        let mut current: Option<String> = None;
        for line in out.lines() {
            let trimmed = line.trim_start();
            if let Some(rest) = ["=== RUN", "=== PAUSE", "=== CONT", "=== NAME"]
                .iter()
                .find_map(|m| trimmed.strip_prefix(m))
            {
                current = case_of(rest.trim());
                if trimmed.starts_with("=== RUN")
                    && let Some(c) = &current
                {
                    r.started.insert(c.clone());
                }
                continue;
            }
            if let Some((outcome, name)) = ended(trimmed) {
                match case_of(name) {
                    Some(case) => {
                        r.cases.insert(case, outcome);
                    }
                    None if name == GO_TEST => r.top = Some(outcome),
                    None => {}
                }
                current = None;
                continue;
            }
            if let Some(c) = &current {
                r.logs.entry(c.clone()).or_default().push(line.to_string());
            }
        }
        r
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.cases.values().filter(|o| **o == outcome).count()
    }

    fn summary(&self, version: &str) -> String {
        let mut s = format!(
            "containerd {version} snapshotter suite on hyperbox: {} cases, {} passed, {} failed, {} skipped",
            self.cases.len(),
            self.count(Outcome::Pass),
            self.count(Outcome::Fail),
            self.count(Outcome::Skip),
        );
        for (case, outcome) in &self.cases {
            s.push_str(&format!("\n  {outcome:?} {case}"));
        }
        s
    }

    /// Whether `case` logged a line containing `text`.
    fn logged(&self, case: &str, text: &str) -> bool {
        self.logs
            .get(case)
            .is_some_and(|log| log.iter().any(|l| l.contains(text)))
    }

    /// The last `lines` lines a case logged, without containerd's debug
    /// logging (every mount it activates), which buries the assertions.
    fn log_tail(&self, case: &str, lines: usize) -> String {
        let log: Vec<&str> = self
            .logs
            .get(case)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(String::as_str)
            .filter(|l| !l.contains(" level=debug "))
            .collect();
        log[log.len().saturating_sub(lines)..].join("\n")
    }
}

/// The case name in a Go test name `GO_TEST/<case>`.
fn case_of(name: &str) -> Option<String> {
    name.strip_prefix(GO_TEST)
        .and_then(|r| r.strip_prefix('/'))
        .map(str::to_string)
}

/// `--- PASS: name (0.01s)` and its FAIL and SKIP forms.
fn ended(line: &str) -> Option<(Outcome, &str)> {
    let (outcome, rest) = [
        ("--- PASS: ", Outcome::Pass),
        ("--- FAIL: ", Outcome::Fail),
        ("--- SKIP: ", Outcome::Skip),
    ]
    .iter()
    .find_map(|(m, o)| line.strip_prefix(m).map(|rest| (*o, rest)))?;
    Some((outcome, rest.split(' ').next().unwrap_or_default()))
}

/// Go, where install-deps puts it or on `PATH`; `None` after printing why
/// the test is skipped (panics under `HYPERBOX_REQUIRE_ALL=1`).
fn go_or_skip() -> Option<PathBuf> {
    let found = ["/usr/local/go/bin/go", "go"]
        .into_iter()
        .map(PathBuf::from)
        .find(|go| {
            Command::new(go)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if found.is_none() {
        let why = "needs Go (/usr/local/go/bin/go or on PATH) to build containerd's suite";
        assert!(
            !prereq::require_all(),
            "containerd_testsuite: prerequisite missing with HYPERBOX_REQUIRE_ALL=1: {why}"
        );
        eprintln!("SKIPPED containerd_testsuite: {why}");
    }
    found
}

fn go_env() -> [(&'static str, String); 5] {
    [
        ("GOPATH", GO_CACHE.into()),
        ("GOMODCACHE", format!("{GO_CACHE}/mod")),
        ("GOCACHE", format!("{GO_CACHE}/cache")),
        // The pinned go.sum is the whole truth; never resolve anew, never
        // fetch another toolchain.
        ("GOFLAGS", "-mod=readonly -buildvcs=false".into()),
        ("GOTOOLCHAIN", "local".into()),
    ]
}

fn module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("containerd-testsuite")
}

/// The suite's test binary, built unless one of the same Go version and
/// module sources is cached.
fn suite_binary(go: &Path) -> PathBuf {
    let src = module_dir();
    let version = Command::new(go)
        .arg("version")
        .output()
        .expect("go version");
    let mut key = Sha256::new();
    key.update(&version.stdout);
    let mut files: Vec<PathBuf> = fs::read_dir(&src)
        .expect("read integration/containerd-testsuite")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "go" || x == "mod" || x == "sum")
        })
        .collect();
    files.sort();
    for f in &files {
        let text = fs::read(f).expect("read module source");
        key.update(f.file_name().unwrap().as_encoded_bytes());
        key.update((text.len() as u64).to_le_bytes());
        key.update(&text);
    }
    let bin = Path::new(GO_CACHE).join("bin").join(format!(
        "containerd-testsuite-{}.test",
        hex::encode(&key.finalize()[..8])
    ));
    if bin.exists() {
        return bin;
    }
    fs::create_dir_all(bin.parent().unwrap()).expect("create the Go cache");
    // Built aside and renamed, so a concurrent run never executes half a file.
    let partial = bin.with_extension(format!("partial-{}", std::process::id()));
    let out = Command::new(go)
        .args(["test", "-c", "-o"])
        .arg(&partial)
        .arg(".")
        .current_dir(&src)
        .envs(go_env())
        .stdin(Stdio::null())
        .output()
        .expect("run go test -c");
    assert!(
        out.status.success(),
        "building containerd's snapshotter suite failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    fs::rename(&partial, &bin).expect("move the built suite into the cache");
    bin
}

/// The containerd version go.mod pins, for the summary.
fn containerd_version() -> String {
    fs::read_to_string(module_dir().join("go.mod"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("github.com/containerd/containerd/v2 ")
                .map(|v| v.split_whitespace().next().unwrap_or(v).to_string())
        })
        .unwrap_or_else(|| "(unknown)".into())
}

/// Snapshot directories under the daemon's root (`<root>/snapshots/*`).
fn snapshot_dirs(root: &Path) -> Vec<PathBuf> {
    fs::read_dir(root.join("snapshots"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The suite's TMPDIR: every root and work directory it makes, and every
/// mount it performs, are under it. Dropped (also on a panic) it unmounts
/// what is left before removing the files, so snapshot contents bound into
/// it are never deleted through a mount.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        Scratch(
            tempfile::Builder::new()
                .prefix("hb-gosuite-")
                .tempdir()
                .expect("suite temp dir")
                .keep(),
        )
    }

    /// Mounts and files the suite left (it removes its own directories).
    fn leaks(&self) -> Vec<String> {
        let mut out: Vec<String> = mounts_under(&self.0)
            .iter()
            .map(|m| format!("mount {}", m.display()))
            .collect();
        if let Ok(entries) = fs::read_dir(&self.0) {
            out.extend(entries.flatten().map(|e| format!("{}", e.path().display())));
        }
        out
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for m in mounts_under(&self.0) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn go_verbose_output_is_read_case_by_case() {
    let out = r#"=== RUN   TestHyperboxSnapshotter
=== RUN   TestHyperboxSnapshotter/Basic
=== PAUSE TestHyperboxSnapshotter/Basic
=== RUN   TestHyperboxSnapshotter/Update
=== PAUSE TestHyperboxSnapshotter/Update
=== RUN   TestHyperboxSnapshotter/Walk
=== PAUSE TestHyperboxSnapshotter/Walk
=== CONT  TestHyperboxSnapshotter/Basic
=== CONT  TestHyperboxSnapshotter/Update
    testsuite.go:701: (c1) wrong updated time
        more detail
=== NAME  TestHyperboxSnapshotter/Basic
    log_hook.go:47: time="2026-12-02T05:00:53Z" level=debug msg="activating mount"
    testsuite.go:10: unmount /tmp/x
=== CONT  TestHyperboxSnapshotter/Walk
--- FAIL: TestHyperboxSnapshotter (1.20s)
    --- PASS: TestHyperboxSnapshotter/Basic (0.10s)
    --- FAIL: TestHyperboxSnapshotter/Update (0.02s)
FAIL
"#;
    let r = Report::parse(out);
    assert_eq!(r.top, Some(Outcome::Fail));
    assert_eq!(r.cases.get("Basic"), Some(&Outcome::Pass));
    assert_eq!(r.cases.get("Update"), Some(&Outcome::Fail));
    // Walk started and never ended: the binary died in it.
    assert!(r.started.contains("Walk") && !r.cases.contains_key("Walk"));
    assert_eq!(
        r.log_tail("Update", 5),
        "    testsuite.go:701: (c1) wrong updated time\n        more detail"
    );
    assert!(r.logged("Update", "wrong updated time") && !r.logged("Basic", "updated"));
    assert_eq!(
        r.log_tail("Basic", 5),
        "    testsuite.go:10: unmount /tmp/x"
    );
}
