//! Prerequisites of the privileged tests, checked before a test starts.
//!
//! On a developer's machine a missing prerequisite skips the test with the
//! reason printed; in CI (`HYPERBOX_REQUIRE_ALL=1`) it fails the test, so a
//! broken install can never pass as a green run of skipped tests.

use std::path::Path;
use std::process::Command;

use crate::containerd::Line;
use crate::gobin;

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prereq {
    /// Effective uid 0 (mounts, cgroups, containerd).
    Root,
    /// The containerd of the line this run tests (`HYPERBOX_CONTAINERD_LINE`,
    /// see [`crate::containerd::Line`]): [`Prereq::Containerd1_7`] or
    /// [`Prereq::Containerd2`].
    Containerd,
    /// Debian's containerd 1.7.x at `/usr/bin/containerd`, whatever the line.
    Containerd1_7,
    /// containerd 2.x built by `scripts/install-deps.sh`: `containerd`,
    /// `containerd-shim-runc-v2` and `ctr` of the pinned release in
    /// [`crate::gobin::containerd_dir`], whatever the line.
    Containerd2,

    /// runc on `PATH`.
    Runc,
    /// Debian's docker-registry.
    Registry,
    /// busybox-static at `/bin/busybox`, the rootfs of test images.
    Busybox,
    /// CNI plugins in `/usr/lib/cni`.
    CniPlugins,
    /// `openssl` and `htpasswd` (apache2-utils), for HTTPS and auth registries.
    TlsTools,
    /// PSI (`/proc/pressure`) and a cgroup v2 tree (pure or hybrid) for
    /// per-container pressure.
    Psi,
    /// Prometheus (Debian package `prometheus`).
    Prometheus,
    /// bpftool (to check what BPF programs are loaded).
    Bpftool,
    /// strace (what a workload reads, [`crate::reads`]).
    Strace,
    /// A [`crate::vm`] guest booting a kernel whose version starts with
    /// this (`"6.12."`): qemu, virtme-ng, udev and the unpacked kernel.
    Vm(&'static str),
}

impl Prereq {
    /// Every prerequisite of a test that runs containers from a registry.
    pub const CONTAINERS: &'static [Prereq] = &[
        Prereq::Root,
        Prereq::Containerd,
        Prereq::Runc,
        Prereq::Registry,
        Prereq::Busybox,
    ];

    /// Why this prerequisite is missing, or `None` when it is present.
    pub fn missing(self) -> Option<String> {
        match self {
            Prereq::Root => (!nix::unistd::geteuid().is_root())
                .then(|| "needs root (mounts, cgroups, containerd)".to_string()),
            Prereq::Containerd => match Line::from_env() {
                Ok(Line::V1_7) => Prereq::Containerd1_7.missing(),
                Ok(Line::V2) => Prereq::Containerd2.missing(),
                Err(e) => Some(e),
            },
            Prereq::Containerd1_7 => {
                match command_output(crate::containerd::CONTAINERD_1_7, &["--version"]) {
                    Some(v) if v.contains(" v1.7.") || v.contains(" 1.7.") => None,
                    Some(v) => Some(format!("needs containerd 1.7, found: {}", v.trim())),
                    None => Some(format!(
                        "{} not found (scripts/install-deps.sh)",
                        crate::containerd::CONTAINERD_1_7
                    )),
                }
            }
            Prereq::Containerd2 => {
                let want = gobin::CONTAINERD_VERSION;
                let tools = [
                    (gobin::containerd(), "--version"),
                    (gobin::containerd_shim(), "-v"),
                    (gobin::ctr(), "--version"),
                ];
                let wrong: Vec<String> = tools
                    .iter()
                    .filter_map(|(bin, arg)| {
                        let v = command_output(&bin.to_string_lossy(), &[arg])?;
                        // Module builds print `2.4.2+unknown`; releases `v2.4.2`.
                        let found = v.split_whitespace().any(|w| {
                            w.trim_start_matches('v')
                                .split('+')
                                .next()
                                .is_some_and(|r| r == want)
                        });
                        (!found).then(|| format!("{} is not {want}: {}", bin.display(), v.trim()))
                    })
                    .collect();
                let absent: Vec<String> = tools
                    .iter()
                    .filter(|(bin, _)| !bin.exists())
                    .map(|(bin, _)| bin.display().to_string())
                    .collect();
                if !absent.is_empty() {
                    Some(format!(
                        "containerd {want} not built: missing {} (scripts/install-deps.sh)",
                        absent.join(", ")
                    ))
                } else if !wrong.is_empty() {
                    Some(wrong.join("; "))
                } else {
                    None
                }
            }
            Prereq::Runc => command_output("runc", &["--version"])
                .is_none()
                .then(|| "runc not found (scripts/install-deps.sh)".into()),
            Prereq::Registry => (!Path::new(crate::registry::REGISTRY_BIN).exists()).then(|| {
                format!(
                    "{} not found (package docker-registry)",
                    crate::registry::REGISTRY_BIN
                )
            }),
            Prereq::Busybox => (!Path::new(crate::image::BUSYBOX).exists())
                .then(|| "/bin/busybox not found (package busybox-static)".into()),
            Prereq::CniPlugins => (!Path::new("/usr/lib/cni/loopback").exists())
                .then(|| "/usr/lib/cni/loopback not found (containernetworking-plugins)".into()),
            Prereq::TlsTools => (command_output("openssl", &["version"]).is_none()
                || Command::new("htpasswd").arg("-h").output().is_err())
            .then(|| "openssl or htpasswd not found (packages openssl, apache2-utils)".into()),
            Prereq::Psi => (!Path::new("/proc/pressure/memory").exists()
                || !(Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
                    || Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()))
            .then(|| "needs PSI (psi=1) and a cgroup v2 hierarchy".into()),
            Prereq::Vm(prefix) => crate::vm::missing(prefix),
            Prereq::Strace => command_output("strace", &["-V"])
                .is_none()
                .then(|| "strace not found (package strace)".into()),
            Prereq::Bpftool => command_output("bpftool", &["version"])
                .is_none()
                .then(|| "bpftool not found (package bpftool)".into()),
            Prereq::Prometheus => command_output("prometheus", &["--version"])
                .is_none()
                .then(|| "prometheus not found (package prometheus)".into()),
        }
    }
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when CI asked that every prerequisite be present.
pub fn require_all() -> bool {
    std::env::var("HYPERBOX_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Checks `needs` for the test `test`. Returns true when the test can run.
/// Returns false after printing why it is skipped, or panics with the reasons
/// when `HYPERBOX_REQUIRE_ALL=1`.
pub fn require(test: &str, needs: &[Prereq]) -> bool {
    let reasons: Vec<String> = needs.iter().filter_map(|p| p.missing()).collect();
    if reasons.is_empty() {
        return true;
    }
    let text = reasons.join("; ");
    if require_all() {
        panic!("{test}: prerequisite missing with HYPERBOX_REQUIRE_ALL=1: {text}");
    }
    eprintln!("SKIPPED {test}: {text}");
    false
}

/// Skips (returns from) the calling test unless every prerequisite is present.
#[macro_export]
macro_rules! require {
    ($($p:expr),+ $(,)?) => {
        if !$crate::prereq::require(module_path!(), &[$($p),+]) {
            return;
        }
    };
}

/// Skips (returns from) the calling test unless everything a test that runs
/// containers from a registry needs is present ([`Prereq::CONTAINERS`]).
#[macro_export]
macro_rules! require_containers {
    () => {
        if !$crate::prereq::require(module_path!(), $crate::prereq::Prereq::CONTAINERS) {
            return;
        }
    };
}
