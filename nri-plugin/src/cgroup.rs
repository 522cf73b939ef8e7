//! Where a container's cgroup lives and what its memory files say, on the
//! three layouts nodes have: pure cgroup v2, hybrid (v1 controllers plus a
//! controller-less v2 tree at `/sys/fs/cgroup/unified`, where PSI still
//! works per cgroup), and pure v1 (no per-cgroup PSI).

use std::path::{Path, PathBuf};

/// The node's cgroup layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Everything under one v2 tree.
    Unified {
        /// Its mount point.
        root: PathBuf,
    },
    /// v1 memory controller, plus a v2 tree for PSI.
    Hybrid {
        /// v1 memory mount.
        memory: PathBuf,
        /// v2 mount.
        unified: PathBuf,
    },
    /// v1 only.
    Legacy {
        /// v1 memory mount.
        memory: PathBuf,
    },
}

impl Layout {
    /// Detects the layout under `base` (normally `/sys/fs/cgroup`).
    pub fn detect(base: &Path) -> Layout {
        if base.join("cgroup.controllers").exists() {
            return Layout::Unified { root: base.into() };
        }
        let memory = base.join("memory");
        let unified = base.join("unified");
        if unified.join("cgroup.procs").exists() {
            Layout::Hybrid { memory, unified }
        } else {
            Layout::Legacy { memory }
        }
    }

    /// The layout's name, as `hb psi` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Layout::Unified { .. } => "v2",
            Layout::Hybrid { .. } => "hybrid",
            Layout::Legacy { .. } => "v1",
        }
    }

    /// Whether the memory controller is v2 (so `memory.high` exists and the
    /// runtime accepts the `unified` map).
    pub fn memory_is_v2(&self) -> bool {
        matches!(self, Layout::Unified { .. })
    }

    /// The cgroup of OCI `cgroupsPath` `path`.
    pub fn locate(&self, cgroups_path: &str) -> Option<Cgroup> {
        let rel = relative_path(cgroups_path)?;
        Some(match self {
            Layout::Unified { root } => Cgroup {
                memory: root.join(&rel),
                psi: Some(root.join(&rel)),
                v2: true,
            },
            Layout::Hybrid { memory, unified } => Cgroup {
                memory: memory.join(&rel),
                psi: Some(unified.join(&rel)),
                v2: false,
            },
            Layout::Legacy { memory } => Cgroup {
                memory: memory.join(&rel),
                psi: None,
                v2: false,
            },
        })
    }
}

/// Why the local API refuses to register a container's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Neither `/a/b/id` nor `slice:prefix:name`, or it leaves the
    /// hierarchy (`..`, `.`, a root).
    #[error("cgroups_path {0:?} is not a cgroup path")]
    NotACgroupPath(String),
    /// The top of a hierarchy or a direct child of it: no runtime puts a
    /// container there.
    #[error("cgroups_path {0:?} is not under a runtime's cgroup parent")]
    TooShallow(String),
    /// Under the host's own units (`init.scope`, `user.slice`, a service).
    #[error("cgroups_path {path:?} is the host's ({component:?}), not a container's")]
    Host {
        /// The path asked for.
        path: String,
        /// The component that belongs to the host.
        component: String,
    },
    /// Under none of the configured runtime cgroup parents.
    #[error(
        "cgroups_path {path:?} is under none of the runtimes' cgroup parents {parents} (agent.cgroup_parents)"
    )]
    OutsideParents {
        /// The path asked for.
        path: String,
        /// The parents, as configured.
        parents: String,
    },
    /// The last component does not name the container.
    #[error("cgroups_path {path:?} does not end in the cgroup of container {id:?}")]
    NotTheContainer {
        /// The path asked for.
        path: String,
        /// The container id registered.
        id: String,
    },
    /// The directory is missing or unreadable.
    #[error("look up the cgroup {0}")]
    Missing(PathBuf, #[source] std::io::Error),
    /// A symlink (or mount) leads elsewhere than the hierarchy.
    #[error("cgroup {0} resolves to {1}, outside its hierarchy")]
    Escapes(PathBuf, PathBuf),
}

/// `agent.cgroup_parents` names something that is no cgroup parent.
#[derive(Debug, thiserror::Error)]
#[error(
    "agent.cgroup_parents: {0:?} is neither a cgroup path below the root (\"/kubepods\") nor a systemd slice (\"kubepods.slice\")"
)]
pub struct BadParent(pub String);

/// The cgroup parents container runtimes put containers under
/// (`agent.cgroup_parents`), as paths below the hierarchy's root; a
/// registration's cgroup must lie strictly below one of them. None
/// configured: any parent (the other rules still hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parents {
    /// As configured, for messages.
    configured: Vec<String>,
    /// Each one relative to the hierarchy root.
    paths: Vec<PathBuf>,
}

impl Parents {
    /// The parents `configured` names: cgroupfs paths (`/kubepods`) or
    /// systemd slices (`kubepods-besteffort.slice`, which lives at
    /// `kubepods.slice/kubepods-besteffort.slice`).
    pub fn new(configured: &[String]) -> Result<Parents, BadParent> {
        let bad = |p: &String| BadParent(p.clone());
        let paths = configured
            .iter()
            .map(|p| {
                let rel = match p.strip_prefix('/') {
                    Some(rest) => PathBuf::from(rest),
                    None if !p.contains('/') => expand_slice(p).ok_or_else(|| bad(p))?,
                    None => return Err(bad(p)),
                };
                let normal = rel
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
                if rel.as_os_str().is_empty() || !normal {
                    return Err(bad(p));
                }
                Ok(rel)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Parents {
            configured: configured.to_vec(),
            paths,
        })
    }

    /// Whether `rel` (relative to the hierarchy root) lies strictly below
    /// one of the parents; always, when none is configured.
    fn contain(&self, rel: &Path) -> bool {
        self.paths.is_empty() || self.paths.iter().any(|p| rel != p && rel.starts_with(p))
    }
}

/// systemd unit kinds that are never a container's cgroup or parent.
const HOST_UNIT_SUFFIXES: &[&str] = &[
    ".service",
    ".socket",
    ".mount",
    ".swap",
    ".target",
    ".timer",
    ".path",
    ".device",
    ".automount",
];

/// `dir` must exist and be exactly `root/rel` once every symlink is
/// resolved.
fn check_real(root: &Path, rel: &Path) -> Result<(), Refused> {
    let dir = root.join(rel);
    let real = dir
        .canonicalize()
        .map_err(|e| Refused::Missing(dir.clone(), e))?;
    let real_root = root
        .canonicalize()
        .map_err(|e| Refused::Missing(root.into(), e))?;
    if real != real_root.join(rel) || !real.is_dir() {
        return Err(Refused::Escapes(dir, real));
    }
    Ok(())
}

impl Layout {
    /// The cgroup a local API registration of container `id` may touch
    /// (the agent writes limits there as root). Accepted: a path that
    /// stays inside the hierarchy, sits at least two levels down (under a
    /// runtime's parent: `/default/<id>`, `kubepods…`, `system.slice:nerdctl:<id>`),
    /// crosses none of the host's own units (`init.scope`, `user.slice`,
    /// `*.service`…), lies below one of `parents` when any is configured,
    /// ends in the container's own cgroup (`<id>`, `<id>.scope` or
    /// `<prefix>-<id>.scope`), and exists as a real directory of the
    /// hierarchy (of each hierarchy on hybrid nodes) with no symlink
    /// leading out.
    pub fn container_cgroup(
        &self,
        cgroups_path: &str,
        id: &str,
        parents: &Parents,
    ) -> Result<Cgroup, Refused> {
        let rel = relative_path(cgroups_path)
            .ok_or_else(|| Refused::NotACgroupPath(cgroups_path.into()))?;
        let names: Vec<&str> = rel
            .components()
            .filter_map(|c| c.as_os_str().to_str())
            .collect();
        if names.len() != rel.components().count() {
            return Err(Refused::NotACgroupPath(cgroups_path.into()));
        }
        if names.len() < 2 {
            return Err(Refused::TooShallow(cgroups_path.into()));
        }
        for (i, n) in names.iter().enumerate() {
            let host = (i == 0 && matches!(*n, "init.scope" | "user.slice"))
                || HOST_UNIT_SUFFIXES.iter().any(|s| n.ends_with(s));
            if host {
                return Err(Refused::Host {
                    path: cgroups_path.into(),
                    component: n.to_string(),
                });
            }
        }
        if !parents.contain(&rel) {
            return Err(Refused::OutsideParents {
                path: cgroups_path.into(),
                parents: format!("{:?}", parents.configured),
            });
        }
        let leaf = names[names.len() - 1];
        let names_it = leaf == id
            || leaf
                .strip_suffix(".scope")
                .and_then(|s| s.strip_suffix(id))
                .is_some_and(|p| p.is_empty() || p.ends_with('-'));
        if id.is_empty() || !names_it {
            return Err(Refused::NotTheContainer {
                path: cgroups_path.into(),
                id: id.into(),
            });
        }
        match self {
            Layout::Unified { root } => check_real(root, &rel)?,
            Layout::Hybrid { memory, unified } => {
                check_real(memory, &rel)?;
                // runc makes the v2 twin too; if it is there, it is real.
                if unified.join(&rel).symlink_metadata().is_ok() {
                    check_real(unified, &rel)?;
                }
            }
            Layout::Legacy { memory } => check_real(memory, &rel)?,
        }
        self.locate(cgroups_path)
            .ok_or_else(|| Refused::NotACgroupPath(cgroups_path.into()))
    }
}

/// The OCI `cgroupsPath` as a path relative to the hierarchy root. Handles
/// the cgroupfs form (`/a/b/id`) and systemd's `slice:prefix:name`
/// (`kubepods-burstable-podX.slice:cri-containerd:ID` is
/// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podX.slice/cri-containerd-ID.scope`).
pub fn relative_path(cgroups_path: &str) -> Option<PathBuf> {
    let p = cgroups_path.trim();
    if p.is_empty() {
        return None;
    }
    let rel = if let Some(rest) = p.strip_prefix('/') {
        PathBuf::from(rest)
    } else {
        let mut parts = p.splitn(3, ':');
        let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
        let mut out = expand_slice(slice)?;
        out.push(if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        });
        out
    };
    // Never leave the hierarchy, whatever the runtime sends.
    if rel
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    Some(rel)
}

/// systemd's slice nesting: `a-b-c.slice` lives in `a.slice/a-b.slice/`.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    if slice.is_empty() || slice == "-.slice" {
        return Some(PathBuf::new());
    }
    let stem = slice.strip_suffix(".slice")?;
    if stem.is_empty() || stem.contains('/') {
        return None;
    }
    let mut out = PathBuf::new();
    let mut acc = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return None;
        }
        if !acc.is_empty() {
            acc.push('-');
        }
        acc.push_str(part);
        out.push(format!("{acc}.slice"));
    }
    Some(out)
}

/// One container's cgroup directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// The memory controller's directory (v1 or v2).
    pub memory: PathBuf,
    /// The v2 directory holding `memory.pressure`, if the node has one.
    pub psi: Option<PathBuf>,
    /// Whether `memory` is a v2 directory.
    pub v2: bool,
}

/// A container's memory figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryStat {
    /// Usage minus inactive file cache (what the kubelet calls the working
    /// set: what would not be reclaimed cheaply).
    pub working_set: u64,
    /// Raw usage.
    pub usage: u64,
    /// The kernel's high-water mark of usage, where it keeps one.
    pub peak: Option<u64>,
    /// The current hard limit (`None`: unlimited).
    pub limit: Option<u64>,
    /// OOM kills in this cgroup so far.
    pub oom_kills: u64,
}

fn read_u64(path: &Path) -> std::io::Result<u64> {
    let s = std::fs::read_to_string(path)?;
    s.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {s:?}", path.display()),
        )
    })
}

fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Limits at or above this are "unlimited" in v1 (PAGE_COUNTER_MAX pages).
const V1_UNLIMITED: u64 = 0x7fff_ffff_ffff_f000;

impl Cgroup {
    /// Whether the cgroup still exists.
    pub fn exists(&self) -> bool {
        self.memory.is_dir()
    }

    /// Reads the memory figures.
    pub fn memory_stat(&self) -> std::io::Result<MemoryStat> {
        let d = &self.memory;
        let stat = std::fs::read_to_string(d.join("memory.stat"))?;
        if self.v2 {
            let usage = read_u64(&d.join("memory.current"))?;
            let inactive = stat_field(&stat, "inactive_file").unwrap_or(0);
            let limit = std::fs::read_to_string(d.join("memory.max"))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            let events = std::fs::read_to_string(d.join("memory.events")).unwrap_or_default();
            Ok(MemoryStat {
                working_set: usage.saturating_sub(inactive),
                usage,
                peak: read_u64(&d.join("memory.peak")).ok(),
                limit,
                oom_kills: stat_field(&events, "oom_kill").unwrap_or(0),
            })
        } else {
            let usage = read_u64(&d.join("memory.usage_in_bytes"))?;
            let inactive = stat_field(&stat, "total_inactive_file").unwrap_or(0);
            let limit = read_u64(&d.join("memory.limit_in_bytes"))
                .ok()
                .filter(|l| *l < V1_UNLIMITED);
            let oom = std::fs::read_to_string(d.join("memory.oom_control")).unwrap_or_default();
            Ok(MemoryStat {
                working_set: usage.saturating_sub(inactive),
                usage,
                peak: read_u64(&d.join("memory.max_usage_in_bytes")).ok(),
                limit,
                oom_kills: stat_field(&oom, "oom_kill").unwrap_or(0),
            })
        }
    }

    /// The container's memory pressure, where the node has per-cgroup PSI.
    pub fn pressure(&self) -> Option<std::io::Result<crate::psi::Pressure>> {
        self.psi
            .as_ref()
            .map(|d| crate::psi::read(&d.join("memory.pressure")))
    }

    /// The file a PSI trigger for this container arms on.
    pub fn pressure_file(&self) -> Option<PathBuf> {
        self.psi.as_ref().map(|d| d.join("memory.pressure"))
    }

    /// Sets the hard limit (and, on v2, `memory.high`) directly, for
    /// containers no NRI runtime manages.
    pub fn set_limit(&self, limit: u64, high: Option<u64>) -> std::io::Result<()> {
        let d = &self.memory;
        if self.v2 {
            // Raise max before high and lower high before max, so high
            // never exceeds max in between.
            let write_high = || match high {
                Some(h) => std::fs::write(d.join("memory.high"), h.to_string()),
                None => Ok(()),
            };
            let current = read_u64(&d.join("memory.max")).unwrap_or(u64::MAX);
            if limit >= current {
                std::fs::write(d.join("memory.max"), limit.to_string())?;
                write_high()
            } else {
                write_high()?;
                std::fs::write(d.join("memory.max"), limit.to_string())
            }
        } else {
            // v1 requires memsw >= limit: raise memsw first when raising.
            let memsw = d.join("memory.memsw.limit_in_bytes");
            let current = read_u64(&d.join("memory.limit_in_bytes")).unwrap_or(u64::MAX);
            let sw = read_u64(&memsw).ok().filter(|v| *v < V1_UNLIMITED);
            if let Some(sw) = sw
                && limit > sw
                && limit > current
            {
                std::fs::write(&memsw, limit.to_string())?;
            }
            std::fs::write(d.join("memory.limit_in_bytes"), limit.to_string())
        }
    }
}

/// The node's total memory in bytes.
pub fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| parse_mem_total(&m))
        .unwrap_or(0)
}

/// `MemTotal:  24576000 kB` → bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let kb = l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
        kb.trim().parse::<u64>().ok().map(|kb| kb * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_paths_resolve() {
        assert_eq!(
            relative_path("/k8s/pod1/abc").unwrap(),
            PathBuf::from("k8s/pod1/abc")
        );
        assert_eq!(
            relative_path("kubepods-burstable-pod12.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            relative_path("system.slice:docker:x").unwrap(),
            PathBuf::from("system.slice/docker-x.scope")
        );
        for bad in ["", "/a/../../etc", "a--b.slice:p:n", "noslice:p:n", "x"] {
            assert!(relative_path(bad).is_none(), "{bad:?} resolved");
        }
    }

    #[test]
    fn layouts_place_memory_and_psi() {
        let hybrid = Layout::Hybrid {
            memory: "/c/memory".into(),
            unified: "/c/unified".into(),
        };
        let cg = hybrid.locate("/p/id").unwrap();
        assert_eq!(cg.memory, PathBuf::from("/c/memory/p/id"));
        assert_eq!(
            cg.pressure_file().unwrap(),
            PathBuf::from("/c/unified/p/id/memory.pressure")
        );
        assert!(!cg.v2 && !hybrid.memory_is_v2());
        let v2 = Layout::Unified { root: "/c".into() };
        assert!(v2.locate("/p/id").unwrap().v2);
        assert!(
            Layout::Legacy {
                memory: "/m".into()
            }
            .locate("/p")
            .unwrap()
            .psi
            .is_none()
        );
    }

    #[test]
    fn registrations_touch_only_a_containers_own_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cgroup");
        for d in [
            "default/app",
            "kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope",
            "system.slice/sshd.service",
            "user.slice/user-0.slice/session-3.scope",
            "init.scope",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        // A symlink out of the hierarchy, where a container's cgroup would be.
        let outside = dir.path().join("elsewhere");
        std::fs::create_dir_all(outside.join("evil")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("linked")).unwrap();
        let v2 = Layout::Unified { root: root.clone() };
        let any = Parents::default();

        let ok = v2.container_cgroup("/default/app", "app", &any).unwrap();
        assert_eq!(ok.memory, root.join("default/app"));
        v2.container_cgroup("kubepods-pod1.slice:cri-containerd:abc", "abc", &any)
            .unwrap();

        let refused = |path: &str, id: &str| {
            let e = v2.container_cgroup(path, id, &any).unwrap_err();
            e.to_string()
        };
        assert!(refused("/default/../../etc", "etc").contains("not a cgroup path"));
        assert!(refused("/app", "app").contains("not under a runtime"));
        assert!(refused("/", "x").contains("not under a runtime"));
        assert!(refused("/system.slice/sshd.service", "sshd.service").contains("the host's"));
        assert!(refused("user.slice:session:3", "3").contains("the host's"));
        assert!(refused("/init.scope/x", "x").contains("the host's"));
        // Another container's (or any) cgroup under a different id.
        assert!(refused("/default/app", "other").contains("does not end in"));
        assert!(refused("/default/app", "").contains("does not end in"));
        assert!(refused("/default/nope", "nope").contains("look up the cgroup"));
        let e = refused("/linked/evil", "evil");
        assert!(e.contains("outside its hierarchy"), "{e}");
        // Hybrid: the v1 memory directory is checked as well.
        let hybrid = Layout::Hybrid {
            memory: dir.path().join("memory"),
            unified: root.clone(),
        };
        assert!(
            hybrid
                .container_cgroup("/default/app", "app", &any)
                .unwrap_err()
                .to_string()
                .contains("look up")
        );
    }

    #[test]
    fn configured_parents_bound_registrations() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cgroup");
        for d in [
            "default/app",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope",
            "kubepods.slice/kubepods-pod2.slice/cri-containerd-def.scope",
            "transient/evil",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let v2 = Layout::Unified { root };
        let parents =
            Parents::new(&["/default".into(), "kubepods-besteffort.slice".into()]).unwrap();
        v2.container_cgroup("/default/app", "app", &parents)
            .unwrap();
        v2.container_cgroup(
            "kubepods-besteffort-pod1.slice:cri-containerd:abc",
            "abc",
            &parents,
        )
        .unwrap();
        for (path, id) in [
            ("/transient/evil", "evil"),
            // kubepods.slice itself is not configured, only its besteffort child.
            ("kubepods-pod2.slice:cri-containerd:def", "def"),
        ] {
            let e = v2.container_cgroup(path, id, &parents).unwrap_err();
            assert!(matches!(e, Refused::OutsideParents { .. }), "{path}: {e}");
            assert!(e.to_string().contains("agent.cgroup_parents"), "{e}");
        }
        // The parent itself is no container's cgroup.
        let e = v2
            .container_cgroup("/default", "default", &parents)
            .unwrap_err();
        assert!(matches!(e, Refused::TooShallow(_)), "{e}");
        // Without parents configured, any parent passes the other rules.
        v2.container_cgroup("/transient/evil", "evil", &Parents::default())
            .unwrap();
        for bad in ["kubepods", "/", "/a/../b", "a/b.slice", "-.slice"] {
            assert!(Parents::new(&[bad.into()]).is_err(), "{bad}");
        }
        assert_eq!(
            Parents::new(&["kubepods-burstable.slice".into()])
                .unwrap()
                .paths,
            [PathBuf::from("kubepods.slice/kubepods-burstable.slice")]
        );
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let m = "MemTotal:       24576000 kB\nMemFree:        100 kB\n";
        assert_eq!(parse_mem_total(m), Some(24576000 * 1024));
        assert!(mem_total() > 0, "this machine's /proc/meminfo");
    }

    #[test]
    fn stat_fields_are_matched_whole() {
        let s = "total_inactive_file 10\ninactive_file 5\n";
        assert_eq!(stat_field(s, "inactive_file"), Some(5));
        assert_eq!(stat_field(s, "total_inactive_file"), Some(10));
        assert_eq!(
            stat_field("oom_kill_disable 0\noom_kill 3\n", "oom_kill"),
            Some(3)
        );
    }
}
