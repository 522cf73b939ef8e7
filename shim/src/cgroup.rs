//! A container's cgroups as the kernel reports them for its init process,
//! on cgroup v1, v2 and hybrid nodes: where they are, what `Stats`
//! returns from them, and OOM kills in them.
//!
//! containerd-shim's `collect_metrics` reads v2 files only; on v1 and
//! hybrid nodes (where containerd reports v1 metrics) it fails, so the
//! metrics are read here for both.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::protobuf::well_known_types::any::Any;

const ROOT: &str = "/sys/fs/cgroup";

/// Where a process's cgroups are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// Pure v2: one directory.
    V2(PathBuf),
    /// v1 controllers (hybrid nodes included): controller → directory.
    V1(HashMap<String, PathBuf>),
}

impl Cgroups {
    /// The cgroups of `pid`, from `/proc/<pid>/cgroup`.
    pub fn of_pid(pid: u32) -> io::Result<Cgroups> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        Ok(Self::parse(&text, Path::new(ROOT)))
    }

    fn parse(text: &str, root: &Path) -> Cgroups {
        let mut v1 = HashMap::new();
        let mut v2 = None;
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if ctrls.is_empty() {
                v2 = Some(rel.to_string());
                continue;
            }
            for c in ctrls.split(',') {
                let c = c.trim_start_matches("name=");
                // cpu and cpuacct share a directory mounted as cpu,cpuacct.
                let mount = match c {
                    "cpu" | "cpuacct" => "cpu,cpuacct",
                    "net_cls" | "net_prio" => "net_cls,net_prio",
                    other => other,
                };
                v1.insert(c.to_string(), root.join(mount).join(rel));
            }
        }
        if v1.is_empty() {
            Cgroups::V2(root.join(v2.unwrap_or_default()))
        } else {
            Cgroups::V1(v1)
        }
    }

    /// The file that counts OOM kills: v1 `memory.oom_control`, v2
    /// `memory.events`.
    pub fn oom_file(&self) -> Option<PathBuf> {
        match self {
            Cgroups::V2(d) => Some(d.join("memory.events")),
            Cgroups::V1(m) => m.get("memory").map(|d| d.join("memory.oom_control")),
        }
    }

    /// OOM kills so far in the cgroup.
    pub fn oom_kills(&self) -> u64 {
        self.oom_file()
            .and_then(|f| read_flat(&f).get("oom_kill").copied())
            .unwrap_or(0)
    }

    /// The `Stats` answer: v1 or v2 metrics, as containerd expects them
    /// for the node's memory controller.
    pub fn metrics(&self) -> io::Result<Any> {
        match self {
            Cgroups::V1(m) => pack(&v1_metrics(m), "io.containerd.cgroups.v1.Metrics"),
            Cgroups::V2(d) => pack(&v2_metrics(d), "io.containerd.cgroups.v2.Metrics"),
        }
    }
}

fn pack(m: &dyn containerd_shim::protos::protobuf::MessageDyn, type_url: &str) -> io::Result<Any> {
    let value = m.write_to_bytes_dyn().map_err(io::Error::other)?;
    Ok(Any {
        type_url: type_url.to_string(),
        value,
        ..Default::default()
    })
}

/// A one-number file; 0 when it cannot be read or says `max` (no limit).
fn read_u64(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A flat keyed file (`memory.stat`, `cpu.stat`, `memory.events`); empty
/// when it cannot be read.
fn read_flat(p: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(p)
        .map(|t| flat(&t))
        .unwrap_or_default()
}

fn flat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn v1_metrics(m: &HashMap<String, PathBuf>) -> v1::Metrics {
    let mut out = v1::Metrics::new();
    if let Some(d) = m.get("pids") {
        out.pids = MessageField::some(v1::PidsStat {
            current: read_u64(&d.join("pids.current")),
            limit: read_u64(&d.join("pids.max")),
            ..Default::default()
        });
    }
    if let Some(d) = m.get("cpuacct") {
        let per_cpu = std::fs::read_to_string(d.join("cpuacct.usage_percpu"))
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let usage = v1::CPUUsage {
            total: read_u64(&d.join("cpuacct.usage")),
            user: read_u64(&d.join("cpuacct.usage_user")),
            kernel: read_u64(&d.join("cpuacct.usage_sys")),
            per_cpu,
            ..Default::default()
        };
        let st = read_flat(&d.join("cpu.stat"));
        let throttling = v1::Throttle {
            periods: st.get("nr_periods").copied().unwrap_or(0),
            throttled_periods: st.get("nr_throttled").copied().unwrap_or(0),
            throttled_time: st.get("throttled_time").copied().unwrap_or(0),
            ..Default::default()
        };
        out.cpu = MessageField::some(v1::CPUStat {
            usage: MessageField::some(usage),
            throttling: MessageField::some(throttling),
            ..Default::default()
        });
    }
    if let Some(d) = m.get("memory") {
        let st = read_flat(&d.join("memory.stat"));
        let g = |k: &str| st.get(k).copied().unwrap_or(0);
        let entry = |prefix: &str| v1::MemoryEntry {
            usage: read_u64(&d.join(format!("{prefix}.usage_in_bytes"))),
            limit: read_u64(&d.join(format!("{prefix}.limit_in_bytes"))),
            max: read_u64(&d.join(format!("{prefix}.max_usage_in_bytes"))),
            failcnt: read_u64(&d.join(format!("{prefix}.failcnt"))),
            ..Default::default()
        };
        out.memory = MessageField::some(v1::MemoryStat {
            cache: g("cache"),
            rss: g("rss"),
            rss_huge: g("rss_huge"),
            mapped_file: g("mapped_file"),
            dirty: g("dirty"),
            writeback: g("writeback"),
            pg_pg_in: g("pgpgin"),
            pg_pg_out: g("pgpgout"),
            pg_fault: g("pgfault"),
            pg_maj_fault: g("pgmajfault"),
            inactive_anon: g("inactive_anon"),
            active_anon: g("active_anon"),
            inactive_file: g("inactive_file"),
            active_file: g("active_file"),
            unevictable: g("unevictable"),
            hierarchical_memory_limit: g("hierarchical_memory_limit"),
            hierarchical_swap_limit: g("hierarchical_memsw_limit"),
            total_cache: g("total_cache"),
            total_rss: g("total_rss"),
            total_rss_huge: g("total_rss_huge"),
            total_mapped_file: g("total_mapped_file"),
            total_dirty: g("total_dirty"),
            total_writeback: g("total_writeback"),
            total_pg_pg_in: g("total_pgpgin"),
            total_pg_pg_out: g("total_pgpgout"),
            total_pg_fault: g("total_pgfault"),
            total_pg_maj_fault: g("total_pgmajfault"),
            total_inactive_anon: g("total_inactive_anon"),
            total_active_anon: g("total_active_anon"),
            total_inactive_file: g("total_inactive_file"),
            total_active_file: g("total_active_file"),
            total_unevictable: g("total_unevictable"),
            usage: MessageField::some(entry("memory")),
            swap: MessageField::some(entry("memory.memsw")),
            kernel: MessageField::some(entry("memory.kmem")),
            kernel_tcp: MessageField::some(entry("memory.kmem.tcp")),
            ..Default::default()
        });
        // containerd 2.x's pod metrics read OOM events from here
        // (container_oom_events_total).
        let oom = read_flat(&d.join("memory.oom_control"));
        let o = |k: &str| oom.get(k).copied().unwrap_or(0);
        out.memory_oom_control = MessageField::some(v1::MemoryOomControl {
            oom_kill_disable: o("oom_kill_disable"),
            under_oom: o("under_oom"),
            oom_kill: o("oom_kill"),
            ..Default::default()
        });
    }
    out
}

fn v2_metrics(d: &Path) -> v2::Metrics {
    let mut out = v2::Metrics::new();
    out.pids = MessageField::some(v2::PidsStat {
        current: read_u64(&d.join("pids.current")),
        limit: read_u64(&d.join("pids.max")),
        ..Default::default()
    });
    let cpu = read_flat(&d.join("cpu.stat"));
    let c = |k: &str| cpu.get(k).copied().unwrap_or(0);
    out.cpu = MessageField::some(v2::CPUStat {
        usage_usec: c("usage_usec"),
        user_usec: c("user_usec"),
        system_usec: c("system_usec"),
        nr_periods: c("nr_periods"),
        nr_throttled: c("nr_throttled"),
        throttled_usec: c("throttled_usec"),
        ..Default::default()
    });
    let st = read_flat(&d.join("memory.stat"));
    let g = |k: &str| st.get(k).copied().unwrap_or(0);
    out.memory = MessageField::some(v2::MemoryStat {
        anon: g("anon"),
        file: g("file"),
        kernel_stack: g("kernel_stack"),
        slab: g("slab"),
        sock: g("sock"),
        shmem: g("shmem"),
        file_mapped: g("file_mapped"),
        file_dirty: g("file_dirty"),
        file_writeback: g("file_writeback"),
        anon_thp: g("anon_thp"),
        inactive_anon: g("inactive_anon"),
        active_anon: g("active_anon"),
        inactive_file: g("inactive_file"),
        active_file: g("active_file"),
        unevictable: g("unevictable"),
        slab_reclaimable: g("slab_reclaimable"),
        slab_unreclaimable: g("slab_unreclaimable"),
        pgfault: g("pgfault"),
        pgmajfault: g("pgmajfault"),
        usage: read_u64(&d.join("memory.current")),
        usage_limit: read_u64(&d.join("memory.max")),
        swap_usage: read_u64(&d.join("memory.swap.current")),
        swap_limit: read_u64(&d.join("memory.swap.max")),
        max_usage: read_u64(&d.join("memory.peak")),
        ..Default::default()
    });
    let ev = read_flat(&d.join("memory.events"));
    let e = |k: &str| ev.get(k).copied().unwrap_or(0);
    out.memory_events = MessageField::some(v2::MemoryEvents {
        low: e("low"),
        high: e("high"),
        max: e("max"),
        oom: e("oom"),
        oom_kill: e("oom_kill"),
        ..Default::default()
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_and_unified_cgroup_files_are_located() {
        let hybrid = "12:memory:/default/c1\n4:cpu,cpuacct:/default/c1\n1:name=systemd:/default/c1\n0::/default/c1\n";
        let Cgroups::V1(m) = Cgroups::parse(hybrid, Path::new("/sys/fs/cgroup")) else {
            panic!("hybrid is v1 for metrics");
        };
        assert_eq!(m["memory"], Path::new("/sys/fs/cgroup/memory/default/c1"));
        assert_eq!(
            m["cpuacct"],
            Path::new("/sys/fs/cgroup/cpu,cpuacct/default/c1")
        );
        let v2 = Cgroups::parse("0::/kubepods/pod1/c1\n", Path::new("/sys/fs/cgroup"));
        assert_eq!(v2, Cgroups::V2("/sys/fs/cgroup/kubepods/pod1/c1".into()));
        assert_eq!(
            v2.oom_file(),
            Some(PathBuf::from(
                "/sys/fs/cgroup/kubepods/pod1/c1/memory.events"
            ))
        );
    }

    #[test]
    fn flat_keyed_files_parse() {
        let m = flat("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n");
        assert_eq!(m["oom_kill"], 3);
    }
}
