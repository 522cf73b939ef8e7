//! The workspace's own binaries, built on demand so that a test never runs a
//! stale one: `cargo test -p hyperbox-integration` alone does not build other
//! packages' binaries, and an old build would silently test old code.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();

/// Set (to `1`) where the binaries were built before this process started
/// and cannot be built now: inside a [`crate::vm`] guest, whose view of the
/// target directory is read-only.
pub const BUILT_ENV: &str = "HYPERBOX_BINARIES_BUILT";

/// True when `bin` must be taken as built ([`BUILT_ENV`]); it must exist.
fn prebuilt(bin: &Path) -> bool {
    let set = std::env::var(BUILT_ENV).is_ok_and(|v| v == "1");
    assert!(
        !set || bin.is_file(),
        "{} not built before the test started ({BUILT_ENV}=1)",
        bin.display()
    );
    set
}

/// `<target>/<profile>` of the running test, which runs from
/// `<target>/<profile>/deps/<test>`; binaries sit in `<profile>`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile> directory")
        .to_path_buf()
}

/// The path of workspace binary `name` (e.g. `hyperbox-snapshotter`), built
/// first with the same cargo and profile as the running test.
pub fn path(name: &str) -> PathBuf {
    let profile_dir = profile_dir();
    let bin = profile_dir.join(name);
    if prebuilt(&bin) {
        return bin;
    }
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().unwrap();
    if built.iter().any(|b| b == name) {
        return bin;
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--bin")
        .arg(name);
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        cmd.arg("--release");
    }
    // Keep the target dir of the running test (CARGO_TARGET_DIR may differ).
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build --bin {name} failed");
    built.push(name.to_string());
    bin
}

/// The shim as nodes should run it: `cargo build-shim` (the `shim` profile,
/// static musl; .cargo/config.toml), built first. Benchmarks measure
/// this build, not the test profile's.
pub fn shim_for_nodes(name: &str) -> PathBuf {
    let target = profile_dir()
        .parent()
        .expect("target directory")
        .to_path_buf();
    let bin = target.join("x86_64-unknown-linux-musl/shim").join(name);
    if prebuilt(&bin) {
        return bin;
    }
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().unwrap();
    let key = format!("shim:{name}");
    if built.contains(&key) {
        return bin;
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The alias lives in the workspace's .cargo/config.toml, which cargo
    // finds from its working directory.
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args(["build-shim", "--quiet"])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("run cargo build-shim");
    assert!(status.success(), "cargo build-shim failed");
    built.push(key);
    bin
}
