//! hyperbox's eBPF tracer: programs written in C (`src/programs/`, built by
//! `build.rs` with clang) and loaded with aya, relocated (CO-RE) against the
//! running kernel's BTF.
//!
//! Tracing is per container: a container is traced while its v2 cgroup id
//! is in the `watched` map. The agent adds it before the workload's first
//! instruction (NRI StartContainer, or the shim's call after `runc
//! create`). Today the programs count every syscall per container (the
//! input of seccomp learning) and report each exec (path and the start of
//! argv), each open (path, flags) and each OOM kill through a ring buffer
//! with a per-CPU drop counter.
//!
//! Dropping the [`Tracer`] detaches every program and frees every map:
//! nothing is pinned, so nothing outlives the process.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, FEntry, RawTracePoint};
use aya::{Btf, Ebpf, EbpfLoader};

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
}

type Result<T> = std::result::Result<T, Error>;

/// `struct syscall_key` of the C side.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SyscallKey {
    cgroup: u64,
    nr: u32,
    pad: u32,
}

// SAFETY: plain integers, no padding beyond the explicit field, any bit
// pattern is valid.
unsafe impl aya::Pod for SyscallKey {}

/// The loaded, attached tracer.
pub struct Tracer {
    syscall_hook: &'static str,
    // Keeps programs and links alive; dropped last.
    _ebpf: Ebpf,
    watched: HashMap<MapData, u64, u32>,
    syscalls: HashMap<MapData, SyscallKey, u64>,
    drops: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("syscall_hook", &self.syscall_hook)
            .field("events_taken", &self.events.is_none())
            .finish_non_exhaustive()
    }
}

fn map<T>(name: &'static str, r: std::result::Result<T, aya::maps::MapError>) -> Result<T> {
    r.map_err(|source| Error::Map { name, source })
}

impl Tracer {
    /// Loads and attaches the programs; `ring_bytes` sizes the event ring
    /// buffer (a power of two, at least a page).
    pub fn load(ring_bytes: u32) -> Result<Tracer> {
        let btf = Btf::from_sys_fs().map_err(Error::Btf)?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .map_max_entries("events", ring_bytes)
            .load(TRACER)
            .map_err(Error::Load)?;
        let prog = |name, source| Error::Program { name, source };
        let syscall_hook = match attach_fentry(&mut ebpf, &btf) {
            Ok(()) => "fentry/x64_sys_call",
            Err(e) => {
                tracing::info!(error = ?e, "fentry on x64_sys_call unavailable; counting syscalls at the sys_enter tracepoint");
                let raw: &mut RawTracePoint = ebpf
                    .program_mut("hb_sys_enter")
                    .ok_or(Error::MissingMap("hb_sys_enter"))?
                    .try_into()
                    .map_err(|e| prog("hb_sys_enter", e))?;
                raw.load().map_err(|e| prog("hb_sys_enter", e))?;
                raw.attach("sys_enter")
                    .map_err(|e| prog("hb_sys_enter", e))?;
                "raw_tracepoint/sys_enter"
            }
        };
        let exec: &mut BtfTracePoint = ebpf
            .program_mut("hb_exec")
            .ok_or(Error::MissingMap("hb_exec"))?
            .try_into()
            .map_err(|e| prog("hb_exec", e))?;
        exec.load("sched_process_exec", &btf)
            .map_err(|e| prog("hb_exec", e))?;
        exec.attach().map_err(|e| prog("hb_exec", e))?;
        let oom: &mut BtfTracePoint = ebpf
            .program_mut("hb_oom")
            .ok_or(Error::MissingMap("hb_oom"))?
            .try_into()
            .map_err(|e| prog("hb_oom", e))?;
        oom.load("mark_victim", &btf)
            .map_err(|e| prog("hb_oom", e))?;
        oom.attach().map_err(|e| prog("hb_oom", e))?;
        let tcp: &mut BtfTracePoint = ebpf
            .program_mut("hb_tcp")
            .ok_or(Error::MissingMap("hb_tcp"))?
            .try_into()
            .map_err(|e| prog("hb_tcp", e))?;
        tcp.load("inet_sock_set_state", &btf)
            .map_err(|e| prog("hb_tcp", e))?;
        tcp.attach().map_err(|e| prog("hb_tcp", e))?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(Error::MissingMap(name))
        };
        let watched = map("watched", HashMap::try_from(take(&mut ebpf, "watched")?))?;
        let syscalls = map("syscalls", HashMap::try_from(take(&mut ebpf, "syscalls")?))?;
        let drops = map("drops", PerCpuArray::try_from(take(&mut ebpf, "drops")?))?;
        let events = map("events", RingBuf::try_from(take(&mut ebpf, "events")?))?;
        Ok(Tracer {
            syscall_hook,
            _ebpf: ebpf,
            watched,
            syscalls,
            drops,
            events: Some(events),
        })
    }

    /// Where syscalls are counted: `fentry/x64_sys_call` or the
    /// `raw_tracepoint/sys_enter` fallback.
    pub fn syscall_hook(&self) -> &'static str {
        self.syscall_hook
    }

    /// Starts tracing the cgroup with v2 id `cgroup`.
    pub fn watch(&mut self, cgroup: u64) -> Result<()> {
        map("watched", self.watched.insert(cgroup, 1, 0))
    }

    /// Stops tracing `cgroup`; returns its final syscall counts and frees
    /// their map entries.
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
        let counts = self.syscalls(cgroup)?;
        for nr in counts.keys() {
            let _ = self.syscalls.remove(&SyscallKey {
                cgroup,
                nr: *nr,
                pad: 0,
            });
        }
        Ok(counts)
    }

    /// Whether `cgroup` is traced.
    pub fn is_watched(&self, cgroup: u64) -> bool {
        self.watched.get(&cgroup, 0).is_ok()
    }

    /// Syscall number → times entered, for `cgroup` so far.
    pub fn syscalls(&self, cgroup: u64) -> Result<BTreeMap<u32, u64>> {
        let mut out = BTreeMap::new();
        for kv in self.syscalls.iter() {
            let (k, v) = map("syscalls", kv)?;
            if k.cgroup == cgroup {
                out.insert(k.nr, v);
            }
        }
        Ok(out)
    }

    /// Syscalls counted so far per cgroup, all cgroups in one pass.
    pub fn totals(&self) -> Result<std::collections::HashMap<u64, u64>> {
        let mut out = std::collections::HashMap::new();
        for kv in self.syscalls.iter() {
            let (k, v) = map("syscalls", kv)?;
            *out.entry(k.cgroup).or_insert(0) += v;
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

    /// The event ring buffer, for one reader ([`EventReader`]).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
}

fn attach_fentry(ebpf: &mut Ebpf, btf: &Btf) -> Result<()> {
    let prog = |source| Error::Program {
        name: "hb_sys_call",
        source,
    };
    let f: &mut FEntry = ebpf
        .program_mut("hb_sys_call")
        .ok_or(Error::MissingMap("hb_sys_call"))?
        .try_into()
        .map_err(prog)?;
    f.load("x64_sys_call", btf).map_err(prog)?;
    f.attach().map_err(prog)?;
    Ok(())
}

/// An event from the ring buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A process in a traced container executed a new image.
    Exec {
        /// Its pid (host view).
        pid: u32,
        /// Its v2 cgroup id.
        cgroup: u64,
        /// Kernel monotonic time, ns.
        time_ns: u64,
        /// The executed path.
        path: String,
        /// The first arguments (up to 128 bytes of argv).
        args: Vec<String>,
    },
    /// A process in a traced container called open/openat.
    Open {
        /// Its pid.
        pid: u32,
        /// Its v2 cgroup id.
        cgroup: u64,
        /// Kernel monotonic time, ns.
        time_ns: u64,
        /// The path as passed (relative paths are relative to the caller).
        path: String,
        /// The open flags (`O_*`).
        flags: u32,
    },
    /// A TCP connection of a traced container closed.
    Flow {
        /// Its v2 cgroup id.
        cgroup: u64,
        /// Kernel monotonic time of the close, ns.
        time_ns: u64,
        /// The container connected (false: it accepted).
        outbound: bool,
        /// Local address and port (IPv4; `None` for IPv6).
        local: Option<std::net::SocketAddrV4>,
        /// Remote address and port (IPv4; `None` for IPv6).
        remote: Option<std::net::SocketAddrV4>,
        /// Bytes received.
        bytes_in: u64,
        /// Bytes sent and acknowledged.
        bytes_out: u64,
        /// How long the connection lived, ns.
        duration_ns: u64,
    },
    /// The OOM killer chose a process of a traced container.
    OomKill {
        /// The victim's pid.
        pid: u32,
        /// Its v2 cgroup id.
        cgroup: u64,
        /// Kernel monotonic time, ns.
        time_ns: u64,
    },
}

const EXEC: u32 = 1;
const OPEN: u32 = 2;
const OOM_KILL: u32 = 3;
const FLOW: u32 = 4;
const FLOW_SIZE: usize = HEAD_SIZE + 48;
const OPEN_SIZE: usize = 32 + PATH_LEN;
const HEAD_SIZE: usize = 24;
const PATH_LEN: usize = 256;
const ARGS_LEN: usize = 128;
const EXEC_SIZE: usize = 32 + PATH_LEN + ARGS_LEN;

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Decodes one ring buffer record; `None` for unknown or short records.
pub fn parse_event(b: &[u8]) -> Option<Event> {
    let u32_at = |o: usize| Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_ne_bytes(b.get(o..o + 8)?.try_into().ok()?));
    match u32_at(0)? {
        EXEC if b.len() >= EXEC_SIZE => {
            let args_len = (u32_at(24)? as usize).min(ARGS_LEN);
            let args = b[32 + PATH_LEN..32 + PATH_LEN + args_len]
                .split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some(Event::Exec {
                pid: u32_at(4)?,
                cgroup: u64_at(8)?,
                time_ns: u64_at(16)?,
                path: cstr(&b[32..32 + PATH_LEN]),
                args,
            })
        }
        OPEN if b.len() >= OPEN_SIZE => Some(Event::Open {
            pid: u32_at(4)?,
            cgroup: u64_at(8)?,
            time_ns: u64_at(16)?,
            flags: u32_at(24)?,
            path: cstr(&b[32..32 + PATH_LEN]),
        }),
        FLOW if b.len() >= FLOW_SIZE => {
            let u16_at = |o: usize| Some(u16::from_ne_bytes(b.get(o..o + 2)?.try_into().ok()?));
            let v4 = u16_at(28)? == 2;
            // Addresses are in network order as the kernel keeps them.
            let addr = |o: usize| {
                let raw: [u8; 4] = b.get(o..o + 4)?.try_into().ok()?;
                Some(std::net::Ipv4Addr::from(raw))
            };
            let (local, remote) = if v4 {
                (
                    Some(std::net::SocketAddrV4::new(addr(36)?, u16_at(30)?)),
                    Some(std::net::SocketAddrV4::new(addr(40)?, u16_at(32)?)),
                )
            } else {
                (None, None)
            };
            Some(Event::Flow {
                cgroup: u64_at(8)?,
                time_ns: u64_at(16)?,
                outbound: u32_at(24)? != 0,
                local,
                remote,
                bytes_in: u64_at(48)?,
                bytes_out: u64_at(56)?,
                duration_ns: u64_at(64)?,
            })
        }
        OOM_KILL if b.len() >= HEAD_SIZE => Some(Event::OomKill {
            pid: u32_at(4)?,
            cgroup: u64_at(8)?,
            time_ns: u64_at(16)?,
        }),
        _ => None,
    }
}

/// The v2 cgroup id of the cgroup directory `dir` (what
/// `bpf_get_current_cgroup_id()` returns for its tasks): the directory's
/// inode number on cgroup2.
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_records_decode_and_short_ones_are_refused() {
        let mut b = vec![0u8; EXEC_SIZE];
        b[0..4].copy_from_slice(&EXEC.to_ne_bytes());
        b[4..8].copy_from_slice(&42u32.to_ne_bytes());
        b[8..16].copy_from_slice(&7u64.to_ne_bytes());
        b[24..28].copy_from_slice(&12u32.to_ne_bytes());
        b[32..41].copy_from_slice(b"/bin/echo");
        b[32 + PATH_LEN..32 + PATH_LEN + 12].copy_from_slice(b"echo\0hello\0\0");
        assert_eq!(
            parse_event(&b),
            Some(Event::Exec {
                pid: 42,
                cgroup: 7,
                time_ns: 0,
                path: "/bin/echo".into(),
                args: vec!["echo".into(), "hello".into()],
            })
        );
        assert_eq!(parse_event(&b[..40]), None);
        let mut o = vec![0u8; OPEN_SIZE];
        o[0..4].copy_from_slice(&OPEN.to_ne_bytes());
        o[24..28].copy_from_slice(&0o101u32.to_ne_bytes());
        o[32..45].copy_from_slice(b"/etc/hostname");
        assert!(matches!(
            parse_event(&o),
            Some(Event::Open { ref path, flags: 0o101, .. }) if path == "/etc/hostname"
        ));
        let mut f = vec![0u8; FLOW_SIZE];
        f[0..4].copy_from_slice(&FLOW.to_ne_bytes());
        f[24..28].copy_from_slice(&1u32.to_ne_bytes());
        f[28..30].copy_from_slice(&2u16.to_ne_bytes());
        f[30..32].copy_from_slice(&40000u16.to_ne_bytes());
        f[32..34].copy_from_slice(&7777u16.to_ne_bytes());
        f[36..40].copy_from_slice(&[127, 0, 0, 1]);
        f[40..44].copy_from_slice(&[127, 0, 0, 2]);
        f[48..56].copy_from_slice(&5u64.to_ne_bytes());
        f[56..64].copy_from_slice(&6u64.to_ne_bytes());
        match parse_event(&f) {
            Some(Event::Flow {
                outbound: true,
                local: Some(l),
                remote: Some(r),
                bytes_in: 5,
                bytes_out: 6,
                ..
            }) => {
                assert_eq!(l.to_string(), "127.0.0.1:40000");
                assert_eq!(r.to_string(), "127.0.0.2:7777");
            }
            other => panic!("{other:?}"),
        }
        let mut k = vec![0u8; HEAD_SIZE];
        k[0..4].copy_from_slice(&OOM_KILL.to_ne_bytes());
        k[4..8].copy_from_slice(&9u32.to_ne_bytes());
        assert!(matches!(
            parse_event(&k),
            Some(Event::OomKill { pid: 9, .. })
        ));
        assert_eq!(parse_event(&[9, 0, 0, 0]), None);
        assert_eq!(parse_event(&[]), None);
    }
}
