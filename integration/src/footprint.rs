//! What one containerd instance may leave on the host, how to remove it by
//! force, and how to prove that nothing is left.
//!
//! The footprint is recorded while the instance runs (its directory, gRPC
//! address, cgroup prefix, and extra resources such as CRI network namespaces)
//! so that teardown works from the host's view alone: it does not need
//! containerd to answer, which is exactly the case after a crash or a panic.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::mount::{MntFlags, umount2};

use crate::procs;

/// Directories under which cgroup hierarchies may be mounted on this host
/// (hybrid: one per v1 controller plus `unified`; pure v2: the root).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Where containerd 1.7 puts shim sockets, whatever its root and state dirs.
pub const SHIM_SOCKET_DIR: &str = "/run/containerd/s";

/// Resources of one containerd instance.
#[derive(Debug, Clone)]
pub struct Footprint {
    /// The instance's private directory (root, state, config, logs).
    pub dir: PathBuf,
    /// Its gRPC socket; every shim it starts carries this in `-address`.
    pub address: PathBuf,
    /// The cgroup parent of every container it runs (`/hyperbox-test-<id>`).
    pub cgroup_prefix: String,
    /// The host bridge CNI pods of this instance attach to.
    pub bridge: String,
    /// Extra things registered while running.
    pub extra: Arc<Mutex<Extra>>,
}

/// Host resources created outside the instance directory.
#[derive(Debug, Default)]
pub struct Extra {
    /// Network namespace bind mounts (CRI puts them in `/var/run/netns`).
    pub netns: Vec<PathBuf>,
    /// Shim sockets seen while running.
    pub shim_sockets: Vec<PathBuf>,
    /// CRI pod sandbox ids (libcni caches results under their names).
    pub sandboxes: Vec<String>,
}

/// Where libcni caches ADD results, `<network>-<sandbox id>-<ifname>`.
const CNI_RESULTS: &str = "/var/lib/cni/results";

fn cni_cache_files(sandbox: &str) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir(CNI_RESULTS) else {
        return Vec::new();
    };
    let needle = format!("-{sandbox}-");
    dir.flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(&needle))
        })
        .collect()
}

impl Footprint {
    /// Shims started by this instance (found by their `-address` argument).
    pub fn shims(&self) -> Vec<procs::ProcInfo> {
        procs::with_arg(&self.address.to_string_lossy())
            .into_iter()
            .filter(|p| {
                p.cmdline
                    .first()
                    .is_some_and(|c| c.contains("containerd-shim"))
            })
            .collect()
    }

    /// Remembers the socket of every shim running now, so teardown can check
    /// that each one is removed.
    pub fn note_shim_sockets(&self) {
        let mut extra = self.extra.lock().unwrap();
        for shim in self.shims() {
            if let Some(sock) = shim_socket_path(&self.address, &shim.cmdline)
                && !extra.shim_sockets.contains(&sock)
            {
                extra.shim_sockets.push(sock);
            }
        }
    }

    /// Ends every process the instance started: containers first, then shims.
    pub fn kill_shims(&self) {
        self.note_shim_sockets();
        let shims = self.shims();
        let mut victims: Vec<i32> = Vec::new();
        for s in &shims {
            victims.extend(procs::descendants(s.pid));
        }
        procs::kill_and_wait(&victims, Duration::from_secs(10));
        let shim_pids: Vec<i32> = shims.iter().map(|s| s.pid).collect();
        procs::kill_and_wait(&shim_pids, Duration::from_secs(10));
        // A shim whose task was deleted exits on its own, a moment later.
        for _ in 0..20 {
            procs::reap_zombie_children("containerd-shim");
            if self.shims().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Unmounts, removes cgroups and files. Safe to call more than once.
    pub fn remove_all(&self) {
        for m in self.mounts_left() {
            let _ = umount2(&m, MntFlags::MNT_DETACH);
        }
        let extra = self.extra.lock().unwrap();
        for ns in &extra.netns {
            let _ = umount2(ns, MntFlags::MNT_DETACH);
            let _ = fs::remove_file(ns);
        }
        for s in &extra.shim_sockets {
            let _ = fs::remove_file(s);
        }
        for f in extra.sandboxes.iter().flat_map(|s| cni_cache_files(s)) {
            let _ = fs::remove_file(f);
        }
        drop(extra);
        if !self.bridge.is_empty() && Path::new("/sys/class/net").join(&self.bridge).exists() {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.bridge])
                .status();
        }
        // Killed tasks leave their cgroups a moment later; retry briefly.
        for _ in 0..50 {
            if self.cgroups_left().is_empty() {
                break;
            }
            for cg in self.cgroups_left() {
                remove_cgroup_tree(&cg);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// Everything still on the host that belongs to the instance, one line each.
    pub fn leaks(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in self.mounts_left() {
            out.push(format!("mount {}", m.display()));
        }
        for p in procs::with_arg(&self.address.to_string_lossy()) {
            out.push(format!("process {} {}", p.pid, p.cmdline.join(" ")));
        }
        // Exited shims are zombies until reaped. A zombie keeps no resources
        // and cannot be attributed to an instance (its arguments are gone;
        // tests run in parallel in one process), so it is reaped here rather
        // than reported against whichever instance checks first.
        procs::reap_zombie_children("containerd-shim");
        for cg in self.cgroups_left() {
            out.push(format!("cgroup {}", cg.display()));
        }
        let extra = self.extra.lock().unwrap();
        for ns in extra.netns.iter().filter(|p| p.exists()) {
            out.push(format!("netns {}", ns.display()));
        }
        for s in extra.shim_sockets.iter().filter(|p| p.exists()) {
            out.push(format!("shim socket {}", s.display()));
        }
        for f in extra.sandboxes.iter().flat_map(|s| cni_cache_files(s)) {
            out.push(format!("CNI result cache {}", f.display()));
        }
        if !self.bridge.is_empty() && Path::new("/sys/class/net").join(&self.bridge).exists() {
            out.push(format!("network interface {}", self.bridge));
        }
        if self.dir.exists() {
            out.push(format!("directory {}", self.dir.display()));
        }
        out
    }

    /// Mount points at or below the instance directory, deepest first.
    pub fn mounts_left(&self) -> Vec<PathBuf> {
        mounts_under(&self.dir)
    }

    /// Cgroup directories of the instance's prefix in every hierarchy.
    pub fn cgroups_left(&self) -> Vec<PathBuf> {
        let rel = self.cgroup_prefix.trim_start_matches('/');
        let mut out = Vec::new();
        if rel.is_empty() {
            return out;
        }
        let Ok(entries) = fs::read_dir(CGROUP_ROOT) else {
            return out;
        };
        let direct = Path::new(CGROUP_ROOT).join(rel);
        if direct.is_dir() {
            out.push(direct);
        }
        for e in entries.flatten() {
            let p = e.path().join(rel);
            if p.is_dir() {
                out.push(p);
            }
        }
        out
    }
}

/// Mount points at or below `dir` from `/proc/self/mountinfo`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> PathBuf {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// Removes a cgroup directory and its children (cgroupfs allows only rmdir of
/// empty groups, so children go first).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// The socket path containerd 1.7 gives a shim: `/run/containerd/s/` plus the
/// hex SHA-256 of `<grpc address>/<namespace>/<id>`, read from the shim's
/// `-namespace` and `-id` arguments.
pub fn shim_socket_path(address: &Path, cmdline: &[String]) -> Option<PathBuf> {
    let arg = |name: &str| {
        cmdline
            .iter()
            .position(|a| a == name)
            .and_then(|i| cmdline.get(i + 1))
    };
    let ns = arg("-namespace")?;
    let id = arg("-id")?;
    let key = address.join(ns).join(id);
    let sum = <sha2::Sha256 as sha2::Digest>::digest(key.to_string_lossy().as_bytes());
    Some(Path::new(SHIM_SOCKET_DIR).join(hex::encode(sum)))
}

/// Name of the file in an instance directory that holds the pid of the test
/// process owning it.
pub const OWNER_FILE: &str = "owner.pid";

/// A new instance directory `prefix*` in the temp dir, kept (its owner
/// tears it down) and marked with this process as [`OWNER_FILE`], so
/// [`sweep_dead_owners`] can find it if this process dies first.
pub fn owned_temp_dir(prefix: &str) -> std::io::Result<PathBuf> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?.keep();
    fs::write(dir.join(OWNER_FILE), std::process::id().to_string())?;
    Ok(dir)
}

/// Tears down instances left by test processes that died without running
/// their teardown (killed by a timeout or SIGKILL): directories named
/// `prefix*` in the temp dir whose owner process is gone. Instances of live
/// processes, including other test runs going on now, are left alone.
/// Returns the directories swept.
pub fn sweep_dead_owners(prefix: &str) -> Vec<PathBuf> {
    let mut swept = Vec::new();
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return swept;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let owner = fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let users = processes_using(&dir);
        // No owner file: from before owners were recorded, or a start in
        // progress; a leftover only if nothing uses it and it is not new.
        let stale = match owner {
            Some(pid) => !procs::alive(pid),
            None => {
                users.is_empty()
                    && e.metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > Duration::from_secs(60))
            }
        };
        if !stale {
            continue;
        }
        let fp = Footprint {
            address: dir.join("containerd.sock"),
            cgroup_prefix: String::new(),
            bridge: String::new(),
            extra: Arc::new(Mutex::new(Extra::default())),
            dir: dir.clone(),
        };
        fp.kill_shims();
        // Orphaned daemons of the dead owner: containerd, registry,
        // snapshotter all name a path inside the directory.
        procs::kill_and_wait(&processes_using(&dir), Duration::from_secs(10));
        procs::reap_zombie_children("containerd-shim");
        fp.remove_all();
        swept.push(dir);
    }
    swept
}

/// Processes with an argument inside `dir`.
fn processes_using(dir: &Path) -> Vec<i32> {
    let prefix = dir.to_string_lossy();
    procs::all()
        .into_iter()
        .filter(|p| p.cmdline.iter().any(|a| a.starts_with(prefix.as_ref())))
        .map(|p| p.pid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_octal_escapes_are_decoded() {
        assert_eq!(
            unescape_mount_path(r"/tmp/a\040b\134c"),
            PathBuf::from("/tmp/a b\\c")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn shim_socket_needs_namespace_and_id() {
        let args: Vec<String> = ["containerd-shim-runc-v2", "-namespace", "ns", "-id", "c1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = shim_socket_path(Path::new("/tmp/x/c.sock"), &args).unwrap();
        assert!(p.starts_with(SHIM_SOCKET_DIR));
        assert_eq!(p.file_name().unwrap().len(), 64);
        assert!(shim_socket_path(Path::new("/tmp/x/c.sock"), &args[..3]).is_none());
    }
}
