//! hyperbox's eBPF tracer: programs written in C (`src/programs/`, built by
//! `build.rs` with clang) and loaded with aya, relocated (CO-RE) against the
//! running kernel's BTF.
//!
//! Tracing is per container: a container is traced while its cgroup id
//! (v2, or on pure v1 hosts its v1 memory cgroup's) is in the `watched`
//! map. The agent adds it before the workload's first instruction (NRI
//! StartContainer, or the shim's call after `runc create`). The programs
//! count every syscall per container in the kernel (the input of seccomp
//! learning) and report each exec (path and the start of argv), each open
//! (path, flags; sampled when the ring fills), each TCP connection at close
//! and each OOM kill through a ring buffer with per-CPU drop counters.
//!
//! The syscall hook is attached only while some container is watched:
//! with nothing to trace, the node's syscalls pay nothing. Seccomp
//! refusals of enforcing containers are seen where the seccomp filter
//! returns (`fexit/__seccomp_filter`, which only filtered tasks reach),
//! or where the kernel does not allow that, at the `sys_exit` tracepoint,
//! attached only while a reporting container is watched.
//!
//! Dropping the [`Tracer`] detaches every program and frees every map:
//! nothing is pinned, so nothing outlives the process.
//!
//! The records the programs share with this crate (map keys and values,
//! ring records) are declared once in C, `src/programs/records.h`, and
//! mirrored in `records`; both sides assert the same sizes and offsets.
//! [`parse_event`] turns a ring record into an [`Event`].

#![deny(missing_docs)]

mod event;
mod records;

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use aya::maps::{CgrpStorage, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::fentry::FEntryLinkId;
use aya::programs::fexit::FExitLinkId;
use aya::programs::raw_trace_point::RawTracePointLinkId;
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::programs::{BtfTracePoint, FEntry, FExit, RawTracePoint};
use aya::{Btf, Ebpf, EbpfLoader};
use zerocopy::FromZeros;

pub use crate::event::{Event, parse_event};

/// Set in a syscall number (the keys of [`Tracer::syscalls`]) entered
/// through the 32-bit entry (`int 0x80`, i386 numbering).
pub const COMPAT: u32 = 1 << 16;
use crate::records::{FlowStart, SampleState, SyscallCounts, SyscallKey, Watch};

/// The compiled programs.
static TRACER: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer.bpf.o"));

/// Errors of loading or using the tracer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel's BTF is unreadable (CO-RE needs it).
    #[error("read the kernel's BTF (/sys/kernel/btf/vmlinux)")]
    Btf(#[source] aya::BtfError),
    /// Loading the object failed (verifier, relocation, permissions).
    #[error("load the eBPF tracer")]
    Load(#[source] aya::EbpfError),
    /// Loading or attaching one program failed.
    #[error("eBPF program {name}")]
    Program {
        /// Its name.
        name: &'static str,
        /// The cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("eBPF map {name}")]
    Map {
        /// Its name.
        name: &'static str,
        /// The cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// A map the object must have is missing.
    #[error("eBPF object has no map {0}")]
    MissingMap(&'static str),
    /// A program the object must have is missing.
    #[error("eBPF object has no program {0}")]
    MissingProgram(&'static str),
    /// A watched container's cgroup directory could not be opened.
    #[error("open cgroup {}", dir.display())]
    Cgroup {
        /// The directory.
        dir: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// The event ring buffer as the reader holds it.
pub type EventRing = RingBuf<MapData>;

/// A traced container's events the kernel could not send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lost {
    /// Events lost to a full ring buffer.
    pub dropped: u64,
    /// Opens left out by sampling while the ring was filling.
    pub sampled: u64,
}

impl From<Watch> for Lost {
    fn from(w: Watch) -> Lost {
        Lost {
            dropped: w.dropped,
            sampled: w.sampled,
        }
    }
}

/// How the tracer loads.
#[derive(Debug, Clone)]
pub struct Options {
    /// Size of the event ring buffer (a power of two, at least a page).
    pub ring_bytes: u32,
    /// Pure cgroup v1 hosts: the index of the v1 controller (as listed in
    /// `/proc/cgroups`) whose cgroup identifies a container; `None` to use
    /// the v2 cgroup id.
    pub v1_subsys: Option<u32>,
    /// Unread bytes in the ring above which opens are sampled.
    pub sample_above: u64,
    /// Under sampling, one open in this many is sent.
    pub sample_one_in: u32,
    /// Unread bytes at which an open wakes the reader (which must also
    /// drain the ring on a timer).
    pub wakeup_above: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ring_bytes: 256 << 10,
            v1_subsys: None,
            sample_above: 128 << 10,
            sample_one_in: 16,
            wakeup_above: 16 << 10,
        }
    }
}

/// Where syscalls are counted, and the link while attached.
#[derive(Debug)]
enum SyscallHook {
    /// fentry on the dispatcher, counting in cgroup storage.
    FEntry(Option<FEntryLinkId>),
    /// The sys_enter BTF tracepoint, counting in cgroup storage.
    BtfTracepoint(Option<BtfTracePointLinkId>),
    /// Pure v1: the raw sys_enter tracepoint, counting in a hash.
    RawTracepoint(Option<RawTracePointLinkId>),
}

/// Where seccomp refusals are seen, and the link while attached.
#[derive(Debug)]
enum RefusalHook {
    /// fexit on the seccomp filter: only filtered tasks pay for it.
    FExit(Option<FExitLinkId>),
    /// The sys_exit BTF tracepoint: every task on the node pays for it.
    BtfTracepoint(Option<BtfTracePointLinkId>),
    /// Pure v1 hosts: refusals are not reported (no cgroup storage).
    None,
}

/// Where containers' syscall counts live.
enum Counts {
    /// In each v2 cgroup's local storage, reached through its directory
    /// (kept open while watched).
    Storage {
        map: CgrpStorage<MapData, SyscallCounts>,
        /// Counts of watched cgroups already removed (`removed` map).
        removed: HashMap<MapData, u64, SyscallCounts>,
        dirs: std::collections::HashMap<u64, std::fs::File>,
    },
    /// In the {cgroup id, nr} hash (pure v1 hosts).
    Hash(HashMap<MapData, SyscallKey, u64>),
}

/// The loaded, attached tracer.
pub struct Tracer {
    hook: SyscallHook,
    // Keeps programs and links alive; dropped last.
    ebpf: Ebpf,
    watched: HashMap<MapData, u64, Watch>,
    // Cgroups whose syscalls are counted (the syscall hook is attached
    // while there is one).
    counting: HashSet<u64>,
    /// Cgroups whose refusals are reported (v2).
    reporting: HashSet<u64>,
    /// Where refusals are seen, linked while `reporting` is not empty.
    refusal: RefusalHook,
    counts: Counts,
    flows: HashMap<MapData, u64, FlowStart>,
    drops: PerCpuArray<MapData, u64>,
    sampled: PerCpuArray<MapData, SampleState>,
    events: Option<RingBuf<MapData>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("syscall_hook", &self.hook)
            .field("refusal_hook", &self.refusal)
            .field("counting", &self.counting.len())
            .field("events_taken", &self.events.is_none())
            .finish_non_exhaustive()
    }
}

fn map<T>(name: &'static str, r: std::result::Result<T, aya::maps::MapError>) -> Result<T> {
    r.map_err(|source| Error::Map { name, source })
}

impl Tracer {
    /// Loads the programs and attaches those that cost nothing until a
    /// container is watched; the syscall hook waits for the first watch.
    pub fn load(opts: &Options) -> Result<Tracer> {
        let btf = Btf::from_sys_fs().map_err(Error::Btf)?;
        let v1 = opts.v1_subsys.map_or(0, |i| i + 1);
        let mut loader = EbpfLoader::new();
        if v1 == 0 {
            // Counts are in cgroup storage: the v1 hash is never used.
            loader.map_max_entries("syscalls", 1);
        }
        let mut ebpf = loader
            .btf(Some(&btf))
            .map_max_entries("events", opts.ring_bytes)
            .override_global("hb_v1_subsys", &v1, true)
            .override_global("hb_sample_above", &opts.sample_above, true)
            .override_global("hb_sample_one_in", &opts.sample_one_in, true)
            .override_global("hb_wakeup_above", &opts.wakeup_above, true)
            .load(TRACER)
            .map_err(Error::Load)?;
        let prog = |name, source| Error::Program { name, source };
        let hook = if v1 != 0 {
            let raw: &mut RawTracePoint = program(&mut ebpf, "hb_sys_enter_v1")?;
            raw.load().map_err(|e| prog("hb_sys_enter_v1", e))?;
            SyscallHook::RawTracepoint(None)
        } else {
            match load_fentry(&mut ebpf, &btf) {
                Ok(()) => SyscallHook::FEntry(None),
                Err(e) => {
                    tracing::info!(error = ?e, "fentry on x64_sys_call unavailable; counting syscalls at the sys_enter tracepoint");
                    let tp: &mut BtfTracePoint = program(&mut ebpf, "hb_sys_enter")?;
                    tp.load("sys_enter", &btf)
                        .map_err(|e| prog("hb_sys_enter", e))?;
                    SyscallHook::BtfTracepoint(None)
                }
            }
        };
        // Loaded on v2 hosts, attached only while a reporting container is
        // watched: the tracepoint costs every syscall on the node, and even
        // fexit costs every filtered task's syscalls (containers under
        // containerd's default profile too) a trampoline call, while
        // attaching it is one text patch.
        let refusal = if v1 != 0 {
            RefusalHook::None
        } else {
            match load_fexit(&mut ebpf, &btf) {
                Ok(()) => RefusalHook::FExit(None),
                Err(e) => {
                    tracing::info!(error = ?e, "fexit on __seccomp_filter unavailable; seeing seccomp refusals at the sys_exit tracepoint");
                    let exit: &mut BtfTracePoint = program(&mut ebpf, "hb_sys_exit")?;
                    exit.load("sys_exit", &btf)
                        .map_err(|e| prog("hb_sys_exit", e))?;
                    RefusalHook::BtfTracepoint(None)
                }
            }
        };
        let exec: &mut BtfTracePoint = program(&mut ebpf, "hb_exec")?;
        exec.load("sched_process_exec", &btf)
            .map_err(|e| prog("hb_exec", e))?;
        exec.attach().map_err(|e| prog("hb_exec", e))?;
        let rmdir: &mut BtfTracePoint = program(&mut ebpf, "hb_cgroup_rmdir")?;
        rmdir
            .load("cgroup_rmdir", &btf)
            .map_err(|e| prog("hb_cgroup_rmdir", e))?;
        rmdir.attach().map_err(|e| prog("hb_cgroup_rmdir", e))?;
        let oom: &mut BtfTracePoint = program(&mut ebpf, "hb_oom")?;
        oom.load("mark_victim", &btf)
            .map_err(|e| prog("hb_oom", e))?;
        oom.attach().map_err(|e| prog("hb_oom", e))?;
        let tcp: &mut BtfTracePoint = program(&mut ebpf, "hb_tcp")?;
        tcp.load("inet_sock_set_state", &btf)
            .map_err(|e| prog("hb_tcp", e))?;
        tcp.attach().map_err(|e| prog("hb_tcp", e))?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(Error::MissingMap(name))
        };
        let watched = map("watched", HashMap::try_from(take(&mut ebpf, "watched")?))?;
        let counts = if v1 != 0 {
            Counts::Hash(map(
                "syscalls",
                HashMap::try_from(take(&mut ebpf, "syscalls")?),
            )?)
        } else {
            Counts::Storage {
                map: map("counts", CgrpStorage::try_from(take(&mut ebpf, "counts")?))?,
                removed: map("removed", HashMap::try_from(take(&mut ebpf, "removed")?))?,
                dirs: Default::default(),
            }
        };
        let drops = map("drops", PerCpuArray::try_from(take(&mut ebpf, "drops")?))?;
        let sampled = map(
            "sampled",
            PerCpuArray::try_from(take(&mut ebpf, "sampled")?),
        )?;
        let flows = map("flows", HashMap::try_from(take(&mut ebpf, "flows")?))?;
        let events = map("events", RingBuf::try_from(take(&mut ebpf, "events")?))?;
        Ok(Tracer {
            hook,
            ebpf,
            watched,
            counting: HashSet::new(),
            reporting: HashSet::new(),
            refusal,
            counts,
            flows,
            drops,
            sampled,
            events: Some(events),
        })
    }

    /// Where syscalls are counted: `fentry/x64_sys_call` or the
    /// `raw_tracepoint/sys_enter` fallback.
    pub fn syscall_hook(&self) -> &'static str {
        match self.hook {
            SyscallHook::FEntry(_) => "fentry/x64_sys_call",
            SyscallHook::BtfTracepoint(_) => "tp_btf/sys_enter",
            SyscallHook::RawTracepoint(_) => "raw_tracepoint/sys_enter",
        }
    }

    /// Whether the syscall hook is attached now (some container watched).
    pub fn syscall_hook_attached(&self) -> bool {
        matches!(
            self.hook,
            SyscallHook::FEntry(Some(_))
                | SyscallHook::BtfTracepoint(Some(_))
                | SyscallHook::RawTracepoint(Some(_))
        )
    }

    fn attach_syscall_hook(&mut self) -> Result<()> {
        let prog = |name, source| Error::Program { name, source };
        match &mut self.hook {
            SyscallHook::FEntry(link @ None) => {
                let f: &mut FEntry = program(&mut self.ebpf, "hb_sys_call")?;
                *link = Some(f.attach().map_err(|e| prog("hb_sys_call", e))?);
            }
            SyscallHook::BtfTracepoint(link @ None) => {
                let t: &mut BtfTracePoint = program(&mut self.ebpf, "hb_sys_enter")?;
                *link = Some(t.attach().map_err(|e| prog("hb_sys_enter", e))?);
            }
            SyscallHook::RawTracepoint(link @ None) => {
                let r: &mut RawTracePoint = program(&mut self.ebpf, "hb_sys_enter_v1")?;
                *link = Some(
                    r.attach("sys_enter")
                        .map_err(|e| prog("hb_sys_enter_v1", e))?,
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// Where seccomp refusals are seen: `fexit/__seccomp_filter`, the
    /// `tp_btf/sys_exit` fallback, or `None` (pure v1 hosts: not reported).
    pub fn refusal_hook(&self) -> Option<&'static str> {
        match self.refusal {
            RefusalHook::FExit(_) => Some("fexit/__seccomp_filter"),
            RefusalHook::BtfTracepoint(_) => Some("tp_btf/sys_exit"),
            RefusalHook::None => None,
        }
    }

    /// Whether the refusal hook is attached now (some reporting cgroup
    /// watched).
    pub fn refusal_hook_attached(&self) -> bool {
        matches!(
            self.refusal,
            RefusalHook::FExit(Some(_)) | RefusalHook::BtfTracepoint(Some(_))
        )
    }

    fn attach_refusal_hook(&mut self) -> Result<()> {
        let prog = |name, source| Error::Program { name, source };
        match &mut self.refusal {
            RefusalHook::FExit(link @ None) => {
                let f: &mut FExit = program(&mut self.ebpf, "hb_seccomp_exit")?;
                *link = Some(f.attach().map_err(|e| prog("hb_seccomp_exit", e))?);
            }
            RefusalHook::BtfTracepoint(link @ None) => {
                let t: &mut BtfTracePoint = program(&mut self.ebpf, "hb_sys_exit")?;
                *link = Some(t.attach().map_err(|e| prog("hb_sys_exit", e))?);
            }
            _ => {}
        }
        Ok(())
    }

    fn detach_refusal_hook(&mut self) -> Result<()> {
        let prog = |name, source| Error::Program { name, source };
        match &mut self.refusal {
            RefusalHook::FExit(link) => {
                if let Some(id) = link.take() {
                    let f: &mut FExit = program(&mut self.ebpf, "hb_seccomp_exit")?;
                    f.detach(id).map_err(|e| prog("hb_seccomp_exit", e))?;
                }
            }
            RefusalHook::BtfTracepoint(link) => {
                if let Some(id) = link.take() {
                    let t: &mut BtfTracePoint = program(&mut self.ebpf, "hb_sys_exit")?;
                    t.detach(id).map_err(|e| prog("hb_sys_exit", e))?;
                }
            }
            RefusalHook::None => {}
        }
        Ok(())
    }

    fn detach_syscall_hook(&mut self) -> Result<()> {
        let prog = |name, source| Error::Program { name, source };
        match &mut self.hook {
            SyscallHook::FEntry(link) => {
                if let Some(id) = link.take() {
                    let f: &mut FEntry = program(&mut self.ebpf, "hb_sys_call")?;
                    f.detach(id).map_err(|e| prog("hb_sys_call", e))?;
                }
            }
            SyscallHook::BtfTracepoint(link) => {
                if let Some(id) = link.take() {
                    let t: &mut BtfTracePoint = program(&mut self.ebpf, "hb_sys_enter")?;
                    t.detach(id).map_err(|e| prog("hb_sys_enter", e))?;
                }
            }
            SyscallHook::RawTracepoint(link) => {
                if let Some(id) = link.take() {
                    let r: &mut RawTracePoint = program(&mut self.ebpf, "hb_sys_enter_v1")?;
                    r.detach(id).map_err(|e| prog("hb_sys_enter_v1", e))?;
                }
            }
        }
        Ok(())
    }

    /// Starts tracing the cgroup with id `cgroup` whose directory is
    /// `dir` (attaching the syscall hook for the first one). With
    /// `from_exec`, its syscalls are counted from the next exec in it on
    /// (a container watched between `runc create` and `runc start`: what
    /// runc's init does before it execs the workload is not the
    /// workload's). With `report` (v2 only), its syscalls refused with
    /// EPERM or ENOSYS come as [`Event::Refused`], once per number (the
    /// refusal hook is attached while such a cgroup is watched; through
    /// the `sys_exit` fallback any syscall failing so comes, not only
    /// those seccomp refused).
    pub fn watch(&mut self, cgroup: u64, dir: &Path, from_exec: bool, report: bool) -> Result<()> {
        if let Counts::Storage { map: m, dirs, .. } = &mut self.counts
            && !dirs.contains_key(&cgroup)
        {
            let f = std::fs::File::open(dir).map_err(|source| Error::Cgroup {
                dir: dir.into(),
                source,
            })?;
            let mut c = SyscallCounts::new_zeroed();
            c.armed = u32::from(!from_exec);
            c.report = u32::from(report);
            map("counts", m.insert(&f, c, 0))?;
            dirs.insert(cgroup, f);
            if report {
                self.reporting.insert(cgroup);
                self.attach_refusal_hook()?;
            }
        }
        self.attach_syscall_hook()?;
        if matches!(self.counts, Counts::Hash(_)) && self.watched.get(&cgroup, 0).is_err() {
            let w = Watch {
                armed: u32::from(!from_exec),
                ..Watch::default()
            };
            map("watched", self.watched.insert(cgroup, w, 0))?;
        }
        self.set_counting(cgroup, true)?;
        self.counting.insert(cgroup);
        Ok(())
    }

    /// Stops tracing `cgroup`; returns its final syscall counts (empty if
    /// counting had stopped already) and frees their map entries.
    pub fn unwatch(&mut self, cgroup: u64) -> Result<BTreeMap<u32, u64>> {
        match self.watched.remove(&cgroup) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(Error::Map {
                    name: "watched",
                    source,
                });
            }
        }
        let counts = self.stop_counting(cgroup)?;
        self.drop_storage(cgroup)?;
        Ok(counts)
    }

    /// Stops counting `cgroup`'s syscalls (and seeing its opens) while its
    /// execs, connections and OOM kills stay traced; returns the counts so
    /// far. The syscall hook stays attached until [`Tracer::detach_if_idle`].
    /// A reporting cgroup keeps its storage (the refusal hook reads it), its
    /// counts zeroed so a later sample does not count them twice.
    pub fn stop_counting(&mut self, cgroup: u64) -> Result<BTreeMap<u32, u64>> {
        if !self.counting.remove(&cgroup) {
            return Ok(BTreeMap::new());
        }
        if matches!(self.counts, Counts::Hash(_)) && self.watched.get(&cgroup, 0).is_ok() {
            self.set_counting(cgroup, false)?;
        }
        let counts = self.syscalls(cgroup)?;
        let reporting = self.reporting.contains(&cgroup);
        match &mut self.counts {
            Counts::Storage { map: m, dirs, .. } if reporting => {
                if let Some(f) = dirs.get(&cgroup)
                    && let Ok(mut c) = m.get(f, 0)
                {
                    c.n = [0; records::NR_SYSCALLS];
                    c.compat = [0; records::NR_SYSCALLS];
                    map("counts", m.insert(f, c, 0))?;
                }
            }
            Counts::Storage { .. } => self.drop_storage(cgroup)?,
            Counts::Hash(h) => {
                for nr in counts.keys() {
                    let _ = h.remove(&SyscallKey {
                        cgroup,
                        nr: *nr,
                        pad: 0,
                    });
                }
            }
        }
        Ok(counts)
    }

    /// Frees `cgroup`'s storage (v2) and its reporting, detaching the refusal
    /// hook with the last reporting cgroup.
    fn drop_storage(&mut self, cgroup: u64) -> Result<()> {
        if self.reporting.remove(&cgroup) && self.reporting.is_empty() {
            self.detach_refusal_hook()?;
        }
        if let Counts::Storage { map, dirs, removed } = &mut self.counts {
            if let Some(f) = dirs.remove(&cgroup) {
                let _ = map.remove(&f);
            }
            let _ = removed.remove(&cgroup);
        }
        Ok(())
    }

    /// Detaches the syscall hook if no cgroup is counted; returns whether
    /// it is detached. Attaching and detaching a syscall tracepoint walks
    /// every thread on the node, so callers linger before calling this
    /// rather than flap it between short-lived containers.
    pub fn detach_if_idle(&mut self) -> Result<bool> {
        if self.counting.is_empty() {
            self.detach_syscall_hook()?;
        }
        Ok(!self.syscall_hook_attached())
    }

    /// Whether any cgroup's syscalls are counted.
    pub fn is_counting(&self) -> bool {
        !self.counting.is_empty()
    }

    /// Frees the kernel's record of `cgroup`'s connections still open
    /// (the container was removed and its sockets outlived it); returns
    /// how many there were.
    pub fn forget_flows(&mut self, cgroup: u64) -> usize {
        let keys: Vec<u64> = self
            .flows
            .iter()
            .filter_map(|kv| kv.ok())
            .filter(|(_, f)| f.cgroup == cgroup)
            .map(|(k, _)| k)
            .collect();
        for k in &keys {
            let _ = self.flows.remove(k);
        }
        keys.len()
    }

    /// Connections open now, per cgroup.
    pub fn open_flows(&self) -> std::collections::HashMap<u64, u64> {
        let mut out = std::collections::HashMap::new();
        for (_, f) in self.flows.iter().filter_map(|kv| kv.ok()) {
            *out.entry(f.cgroup).or_insert(0) += 1;
        }
        out
    }

    /// Whether `cgroup` is traced.
    pub fn is_watched(&self, cgroup: u64) -> bool {
        self.watched.get(&cgroup, 0).is_ok()
    }

    /// Watches `cgroup` (if it is not yet) and sets whether it is counted,
    /// keeping what it lost so far: samples re-watch containers. (A loss
    /// the kernel adds between the read and the write here is not kept;
    /// losses happen only under pressure, and the node totals keep all.)
    fn set_counting(&mut self, cgroup: u64, counting: bool) -> Result<()> {
        let w = Watch {
            counting: counting.into(),
            ..self.watched.get(&cgroup, 0).unwrap_or_default()
        };
        map("watched", self.watched.insert(cgroup, w, 0))
    }

    /// What the kernel could not send of `cgroup`'s events while it was
    /// watched (zero once unwatched: read it before).
    pub fn lost(&self, cgroup: u64) -> Lost {
        self.watched
            .get(&cgroup, 0)
            .map(Lost::from)
            .unwrap_or_default()
    }

    /// [`Tracer::lost`] of every watched cgroup, in one pass.
    pub fn all_lost(&self) -> std::collections::HashMap<u64, Lost> {
        self.watched
            .iter()
            .filter_map(|kv| kv.ok())
            .map(|(cgroup, w)| (cgroup, w.into()))
            .collect()
    }

    /// A watched v2 cgroup's counts: in its storage while it exists, then
    /// as the kernel kept them at its removal.
    fn stored_counts(&self, cgroup: u64) -> Result<Option<SyscallCounts>> {
        let Counts::Storage {
            map: m,
            dirs,
            removed,
        } = &self.counts
        else {
            return Ok(None);
        };
        let Some(f) = dirs.get(&cgroup) else {
            return Ok(None);
        };
        match m.get(f, 0) {
            Ok(c) => Ok(Some(c)),
            // Gone with its cgroup (offline: the fd no longer reaches it).
            Err(_) => match removed.get(&cgroup, 0) {
                Ok(c) => Ok(Some(c)),
                Err(aya::maps::MapError::KeyNotFound) => Ok(None),
                Err(source) => Err(Error::Map {
                    name: "removed",
                    source,
                }),
            },
        }
    }

    /// Syscall number → times entered, for `cgroup` so far.
    pub fn syscalls(&self, cgroup: u64) -> Result<BTreeMap<u32, u64>> {
        match &self.counts {
            Counts::Storage { .. } => Ok(self
                .stored_counts(cgroup)?
                .map(SyscallCounts::to_map)
                .unwrap_or_default()),
            Counts::Hash(h) => {
                let mut out = BTreeMap::new();
                for kv in h.iter() {
                    let (k, v) = map("syscalls", kv)?;
                    if k.cgroup == cgroup {
                        out.insert(k.nr, v);
                    }
                }
                Ok(out)
            }
        }
    }

    /// Syscalls counted so far per cgroup, all cgroups in one pass.
    pub fn totals(&self) -> Result<std::collections::HashMap<u64, u64>> {
        let mut out = std::collections::HashMap::new();
        match &self.counts {
            Counts::Storage { dirs, .. } => {
                for cgroup in dirs.keys() {
                    if let Some(c) = self.stored_counts(*cgroup)? {
                        out.insert(*cgroup, c.total());
                    }
                }
            }
            Counts::Hash(h) => {
                for kv in h.iter() {
                    let (k, v) = map("syscalls", kv)?;
                    *out.entry(k.cgroup).or_insert(0) += v;
                }
            }
        }
        Ok(out)
    }

    /// Events lost to a full ring buffer, all CPUs.
    pub fn drops(&self) -> u64 {
        self.drops
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Opens left out by sampling while the ring was filling, all CPUs.
    pub fn sampled(&self) -> u64 {
        self.sampled
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().map(|s| s.out).sum())
            .unwrap_or(0)
    }

    /// The event ring buffer, for its one reader.
    pub fn take_events(&mut self) -> Option<EventRing> {
        self.events.take()
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// Loads the fentry hook and proves it attaches (some kernels refuse
/// fentry); it is detached again until a container is watched.
fn load_fentry(ebpf: &mut Ebpf, btf: &Btf) -> Result<()> {
    let prog = |source| Error::Program {
        name: "hb_sys_call",
        source,
    };
    let f: &mut FEntry = program(ebpf, "hb_sys_call")?;
    f.load("x64_sys_call", btf).map_err(prog)?;
    let link = f.attach().map_err(prog)?;
    f.detach(link).map_err(prog)?;
    Ok(())
}

/// Loads the refusal hook on the seccomp filter and proves it attaches
/// (the function may be inlined or lack BTF on some kernels); it is
/// detached again until a reporting container is watched.
fn load_fexit(ebpf: &mut Ebpf, btf: &Btf) -> Result<()> {
    let prog = |source| Error::Program {
        name: "hb_seccomp_exit",
        source,
    };
    let f: &mut FExit = program(ebpf, "hb_seccomp_exit")?;
    f.load("__seccomp_filter", btf).map_err(prog)?;
    let link = f.attach().map_err(prog)?;
    f.detach(link).map_err(prog)?;
    Ok(())
}

/// The v2 cgroup id of the cgroup directory `dir` (what
/// `bpf_get_current_cgroup_id()` returns for its tasks): the directory's
/// inode number on cgroup2.
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}
