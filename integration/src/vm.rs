//! Tests on kernels other than the host's: the running test binary is
//! started again inside a virtual machine that boots a Debian kernel with
//! the host's filesystem as its root (virtme-ng), so the same tests run on
//! a node the host cannot be, such as a pure cgroup v2 one.
//!
//! `scripts/install-deps.sh` installs qemu and virtme-ng and unpacks the
//! kernels into [`KERNELS`] (`<version>/vmlinuz`), their modules into
//! `/lib/modules/<version>` where the guest, which sees the host's files,
//! loads them from.
//!
//! The guest runs under qemu's software emulation (TCG), not KVM. These
//! machines are themselves virtual machines, and the nested KVM they offer
//! cannot boot a Debian kernel: 6.12's early code stops with "KVM internal
//! error ... emulation failure" on an instruction KVM's emulator does not
//! know, 6.1 hangs before its first message. TCG boots 6.12 in about 25 s
//! on 2 cores; everything in the guest runs several times slower, which
//! the tests' timeouts allow for.
//!
//! The guest's root is the host's, read-only, with `/tmp` a tmpfs of its
//! own: nothing a test does inside reaches the host. The binaries a
//! test needs are built by the host before the boot
//! ([`crate::binaries::BUILT_ENV`]), since the guest cannot write the
//! target directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Where the kernels are unpacked, one directory per `uname -r`.
pub const KERNELS: &str = "/var/cache/hyperbox/kernels";
/// Everything the install and the builds put under /var/cache.
const CACHE: &str = "/var/cache/hyperbox";
/// Set (to `1`) in the environment of a test run inside the guest.
pub const IN_VM_ENV: &str = "HYPERBOX_IN_VM";

/// A kernel a guest can boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Its `uname -r`.
    pub version: String,
    /// The bootable image.
    pub image: PathBuf,
}

/// The unpacked kernels whose version starts with `prefix` (`"6.12."`),
/// newest first, that have their modules where the guest looks.
pub fn kernels(prefix: &str) -> Vec<Kernel> {
    let mut found: Vec<Kernel> = std::fs::read_dir(KERNELS)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().into_owned();
            let image = e.path().join("vmlinuz");
            (version.starts_with(prefix)
                && image.is_file()
                && Path::new("/lib/modules")
                    .join(&version)
                    .join("modules.dep")
                    .is_file())
            .then_some(Kernel { version, image })
        })
        .collect();
    found.sort_by_key(|k| std::cmp::Reverse(version_key(&k.version)));
    found
}

/// A kernel version's numbers, for ordering (`6.12.57` before `6.12.118`).
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// True inside a guest started by [`run`].
pub fn inside() -> bool {
    std::env::var(IN_VM_ENV).is_ok_and(|v| v == "1")
}

/// `d` stretched for the guest's emulated CPU when inside one: for the
/// few waits that give a process a fixed time to show something.
pub fn stretched(d: Duration) -> Duration {
    if inside() { d * 8 } else { d }
}

/// Why a guest cannot be started here, or `None` when it can.
pub fn missing(prefix: &str) -> Option<String> {
    let tool = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !tool("vng", "--version") {
        return Some("vng not found (package virtme-ng; scripts/install-deps.sh)".into());
    }
    if !tool("qemu-system-x86_64", "--version") {
        return Some("qemu-system-x86_64 not found (package qemu-system-x86)".into());
    }
    if !Path::new("/usr/lib/systemd/systemd-udevd").exists()
        && !Path::new("/lib/systemd/systemd-udevd").exists()
    {
        // virtme's init finds its I/O ports through udev's links.
        return Some("systemd-udevd not found (package udev)".into());
    }
    if kernels(prefix).is_empty() {
        return Some(format!(
            "no {prefix}* kernel unpacked in {KERNELS} with modules in /lib/modules \
             (scripts/install-deps.sh)"
        ));
    }
    None
}

/// Quotes `s` for the guest's shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The host's `HYPERBOX_*` settings and log switches, for the guest's
/// environment: a host that overrides where a tool lives overrides it
/// inside too.
pub fn forwarded_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| {
            (k.starts_with("HYPERBOX_") && k != IN_VM_ENV)
                || k == "RUST_BACKTRACE"
                || k == "RUST_LOG"
        })
        .collect()
}

/// Boots `kernel` and runs `script` (shell) in it as root, with `env` set
/// and [`IN_VM_ENV`] = 1; returns what it printed and its exit status.
/// Kills the guest after `timeout`, or when the calling process dies.
pub fn run(kernel: &Kernel, script: &str, env: &[(String, String)], timeout: Duration) -> Output {
    // virtme's /tmp is an overlay over the host's, and overlayfs refuses
    // an overlay as the upper layer of containerd's snapshots.
    let mut text =
        format!("mount -t tmpfs -o mode=1777 guest-tmp /tmp\nexport TMPDIR=/tmp {IN_VM_ENV}=1\n");
    for (k, v) in env {
        text.push_str(&format!("export {k}={}\n", quote(v)));
    }
    text.push_str(script);
    text.push('\n');
    // The script goes in a file the guest reads: `--exec` travels on the
    // kernel's command line, which holds 2047 bytes.
    let dir = Path::new(CACHE).join("vm-scripts");
    std::fs::create_dir_all(&dir).expect("create the guest scripts directory");
    let file = tempfile::Builder::new()
        .suffix(".sh")
        .tempfile_in(&dir)
        .expect("create the guest script");
    std::fs::write(file.path(), text).expect("write the guest script");
    // virtme keeps its files (the exit status of `--exec`, a socket) in
    // the temporary directory and leaves them when a guest is killed; its
    // own, so guests side by side never remove each other's.
    let virtme_tmp = tempfile::Builder::new()
        .prefix("hyperbox-virtme-")
        .tempdir()
        .expect("create virtme's temporary directory");
    let mut cmd = Command::new("timeout");
    cmd.args(["-s", "KILL", &timeout.as_secs().to_string()])
        .arg("vng")
        .arg("--run")
        .arg(&kernel.image)
        // See the module comment: nested KVM cannot boot these kernels.
        .arg("--disable-kvm")
        // Debian builds virtio-mmio, the microvm machine's bus, as a
        // module; q35's virtio-pci is built in.
        .arg("--disable-microvm")
        .args(["--memory", "4G", "--cpus", "2"])
        // One host thread runs both vCPUs. With a thread per vCPU (qemu's
        // default TCG) the guest kernel's live code patching is not
        // coherent across vCPUs: a vCPU can still run the breakpoint the
        // other has already patched away, and 6.12 dies with "Oops: int3"
        // in a static-key site (seen in CI as runc made a container's
        // cgroup, vng status 255). The guest stays a 2-CPU machine.
        // (`=`: the value starts with a dash.)
        .arg("--qemu-opts=-accel tcg,thread=single")
        // The guest kernel's console goes to vng's stderr (with
        // `--verbose`; stdout, which callers parse, stays the script's
        // alone): a guest that dies without an exit status (vng's 255)
        // leaves its panic or OOM report there. `loglevel=6` after
        // vng's `debug` keeps warnings and notices, not debug chatter
        // that would slow an emulated serial port.
        .arg("--verbose")
        .args(["--append", "loglevel=6"])
        // virtme's init mounts an empty tmpfs on /var/cache; the tools,
        // kernels and builds the tests use are shared back, read-only.
        .arg("--rodir")
        .arg(format!("{CACHE}={CACHE}"))
        .arg("--exec")
        .arg(format!("sh {}", quote(&file.path().to_string_lossy())))
        .env("TMPDIR", virtme_tmp.path())
        .current_dir("/");
    // SAFETY: prctl only, async-signal-safe, in the child before exec.
    // `timeout` passes a TERM on to the guest's whole process group, so a
    // test killed midway takes its guest with it.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    cmd.output().expect("run vng")
}

/// Runs `tests` of the calling test binary (`--ignored` ones when
/// `ignored`) in a guest booting `kernel`, after `check` (shell, under
/// `set -e`) has printed `<marker> <kernel version>` to say the guest is
/// the node the tests need; panics unless it did and every test passed.
/// The guest's whole output is kept under `name` ([`keep_output`]). What
/// the tests start must be built before: the guest cannot build.
pub fn run_own_tests(
    kernel: &Kernel,
    name: &str,
    check: &str,
    marker: &str,
    tests: &[&str],
    ignored: bool,
) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut script = format!(
        "set -e; {check}; exec {} --exact --test-threads 1",
        quote(&exe.to_string_lossy())
    );
    if ignored {
        script.push_str(" --ignored");
    }
    for t in tests {
        script.push(' ');
        script.push_str(t);
    }
    let mut env = forwarded_env();
    env.push((crate::binaries::BUILT_ENV.into(), "1".into()));
    env.push(("HYPERBOX_REQUIRE_ALL".into(), "1".into()));
    let out = run(kernel, &script, &env, Duration::from_secs(1800));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = |s: &str| {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    };
    assert!(
        stdout.contains(&format!("{marker} {}", kernel.version)),
        "the guest is not the {marker} {} node the tests need:\n{}\n{}",
        kernel.version,
        tail(&stdout),
        tail(&stderr)
    );
    for l in stdout.lines().filter(|l| l.starts_with("test ")) {
        eprintln!("guest {}: {l}", kernel.version);
    }
    let kept = keep_output(&format!("{name}-{}", kernel.version), &out);
    let passed = format!("test result: ok. {} passed; 0 failed", tests.len());
    assert!(
        out.status.success() && stdout.contains(&passed),
        "{name} on {}: {}\n{}\nthe guest's whole output: {}\n{}",
        kernel.version,
        out.status,
        Some(test_failures(&stdout))
            .filter(|f| !f.is_empty())
            .unwrap_or_else(|| tail(&stdout)),
        kept.display(),
        tail(&stderr)
    );
}

/// Writes a guest's whole output to `<temp dir>/hyperbox-guest-<name>.log`
/// (replaced on each run) and returns the path: a failure message holds
/// only its summary, and the guest's logs are gone with the guest.
pub fn keep_output(name: &str, out: &Output) -> PathBuf {
    let path = std::env::temp_dir().join(format!("hyperbox-guest-{name}.log"));
    let mut text = out.stdout.clone();
    text.extend_from_slice(b"\n== guest stderr\n");
    text.extend_from_slice(&out.stderr);
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("cannot keep the guest's output in {}: {e}", path.display());
    }
    path
}

/// The failures section a libtest binary printed in a guest (each failed
/// test's output and panic), without backtrace frames, which would push
/// the panic itself out of any message short enough to read.
pub fn test_failures(stdout: &str) -> String {
    let Some(start) = stdout.find("\nfailures:\n") else {
        return String::new();
    };
    let mut in_backtrace = false;
    let mut kept = Vec::new();
    for line in stdout[start + 1..].lines() {
        if line.starts_with("stack backtrace:") {
            in_backtrace = true;
            continue;
        }
        if in_backtrace {
            let t = line.trim_start();
            let frame = t.starts_with("at ")
                || t.split_once(':')
                    .is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()));
            if frame || t.starts_with("note: Some details") {
                continue;
            }
            in_backtrace = false;
        }
        kept.push(line);
        if line.starts_with("test result:") {
            break;
        }
    }
    kept.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guests_failures_keep_the_panic_and_drop_the_frames() {
        let stdout = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n\
                      ---- b stdout ----\nsome log\n\nthread 'b' panicked at tests/x.rs:3:5:\n\
                      boom\nstack backtrace:\n   0: core::panicking::panic\n             \
                      at /rustc/x/panicking.rs:1:1\n   1: x::b\nnote: Some details are omitted\n\
                      \n\nfailures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed\nafter\n";
        let f = test_failures(stdout);
        assert!(f.contains("---- b stdout ----"), "{f}");
        assert!(f.contains("boom"), "{f}");
        assert!(f.contains("test result: FAILED"), "{f}");
        assert!(!f.contains("panicking.rs"), "{f}");
        assert!(!f.contains("x::b"), "{f}");
        assert!(!f.contains("after"), "{f}");
        assert_eq!(test_failures("test result: ok. 2 passed"), "");
    }
}
