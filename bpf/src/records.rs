//! Mirrors of the records in `src/programs/records.h`: the map keys and
//! values the tracer reads and writes, and the ring buffer's event records.
//!
//! Each struct asserts at compile time the size and the field offsets that
//! the header asserts for its C twin, so the two cannot drift apart
//! silently. All are native-endian (the kernel writes them on this host),
//! `#[repr(C)]` with explicit padding fields, and derive zerocopy's
//! `FromBytes` (any bytes are a valid value) and `IntoBytes` (no implicit
//! padding): ring records are decoded by copying them out of the bytes,
//! whatever their alignment, and map types are `aya::Pod` on the strength
//! of those two derives.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Longest path an exec or open record carries, NUL included (`PATH_LEN`).
pub(crate) const PATH_LEN: usize = 256;
/// Bytes of argv an exec record carries (`ARGS_LEN`).
pub(crate) const ARGS_LEN: usize = 128;
/// Syscall numbers counted per container (`NR_SYSCALLS`).
pub(crate) const NR_SYSCALLS: usize = 512;

/// `enum event_kind`: the first field of every ring record.
pub(crate) mod kind {
    /// `EVENT_EXEC`, an [`ExecEvent`](super::ExecEvent).
    pub(crate) const EXEC: u32 = 1;
    /// `EVENT_OPEN`, an [`OpenHead`](super::OpenHead) and the path.
    pub(crate) const OPEN: u32 = 2;
    /// `EVENT_OOM_KILL`, an [`OomEvent`](super::OomEvent).
    pub(crate) const OOM_KILL: u32 = 3;
    /// `EVENT_FLOW`, a [`FlowEvent`](super::FlowEvent).
    pub(crate) const FLOW: u32 = 4;
    /// `EVENT_REFUSED`, a [`RefusedEvent`](super::RefusedEvent).
    pub(crate) const REFUSED: u32 = 5;
}

/// Map types are `aya::Pod` only if zerocopy proved them plain bytes: this
/// fails to compile for a type without both derives.
const fn plain_bytes<T: FromBytes + IntoBytes + Immutable>() {}

/// `struct watch`: value of the `watched` map, a traced container.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct Watch {
    /// 1 while its syscalls are counted (read by the v1 hook).
    pub counting: u32,
    /// 1 once the container's first exec was seen (v1 hook).
    pub armed: u32,
    /// Its events lost to a full ring.
    pub dropped: u64,
    /// Its opens left out by sampling.
    pub sampled: u64,
}
const _: () = assert!(size_of::<Watch>() == 24);
const _: () = assert!(offset_of!(Watch, counting) == 0);
const _: () = assert!(offset_of!(Watch, dropped) == 8);
const _: () = assert!(offset_of!(Watch, sampled) == 16);
const _: () = plain_bytes::<Watch>();
// SAFETY: aya copies map keys and values to and from the kernel as raw
// bytes. `Watch` is repr(C) with no implicit padding (its IntoBytes derive
// refuses any), so every byte aya sends is a field's, and every bit
// pattern is a valid `Watch` (FromBytes), so whatever the kernel returns is.
unsafe impl aya::Pod for Watch {}

/// `struct syscall_key`: key of the `syscalls` map (pure v1 hosts).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct SyscallKey {
    pub cgroup: u64,
    pub nr: u32,
    /// Zero: the kernel hashes all 16 bytes.
    pub pad: u32,
}
const _: () = assert!(size_of::<SyscallKey>() == 16);
const _: () = assert!(offset_of!(SyscallKey, cgroup) == 0);
const _: () = assert!(offset_of!(SyscallKey, nr) == 8);
const _: () = plain_bytes::<SyscallKey>();
// SAFETY: as for `Watch`: repr(C), no implicit padding (IntoBytes), any
// bit pattern valid (FromBytes). No hidden byte can make two equal keys
// hash apart in the kernel.
unsafe impl aya::Pod for SyscallKey {}

/// `struct syscall_counts`: a v2 cgroup's local storage in the `counts`
/// map, times each syscall number was entered through the 64-bit and the
/// 32-bit entry, once `armed`.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct SyscallCounts {
    pub armed: u32,
    /// 1: send its EPERM/ENOSYS returns (`EVENT_REFUSED`).
    pub report: u32,
    pub n: [u64; NR_SYSCALLS],
    pub compat: [u64; NR_SYSCALLS],
    /// Numbers already sent as refused (bitmap).
    pub refused: [u64; 2 * NR_SYSCALLS / 64],
}
const _: () = assert!(size_of::<SyscallCounts>() == 8 + 16 * NR_SYSCALLS + 2 * NR_SYSCALLS / 8);
const _: () = assert!(offset_of!(SyscallCounts, n) == 8);
const _: () = plain_bytes::<SyscallCounts>();
// SAFETY: as for `Watch`: repr(C) array of u64, no padding (IntoBytes),
// any bit pattern valid (FromBytes).
unsafe impl aya::Pod for SyscallCounts {}

impl SyscallCounts {
    /// Syscall number → count, for the numbers entered at least once;
    /// 32-bit entries carry [`COMPAT`](crate::COMPAT).
    pub(crate) fn to_map(self) -> BTreeMap<u32, u64> {
        let compat = (0u32..).map(|nr| nr | crate::COMPAT).zip(self.compat);
        (0u32..)
            .zip(self.n)
            .chain(compat)
            .filter(|(_, c)| *c > 0)
            .collect()
    }

    /// Syscalls entered in total.
    pub(crate) fn total(&self) -> u64 {
        self.n.iter().chain(self.compat.iter()).sum()
    }
}

/// `struct flow_start`: value of the `flows` map, an open connection.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct FlowStart {
    pub time_ns: u64,
    pub cgroup: u64,
    pub outbound: u32,
    pub established: u32,
    pub sport: u16,
    pub dport: u16,
    pub pad: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}
const _: () = assert!(size_of::<FlowStart>() == 64);
const _: () = assert!(offset_of!(FlowStart, time_ns) == 0);
const _: () = assert!(offset_of!(FlowStart, cgroup) == 8);
const _: () = assert!(offset_of!(FlowStart, outbound) == 16);
const _: () = assert!(offset_of!(FlowStart, established) == 20);
const _: () = assert!(offset_of!(FlowStart, sport) == 24);
const _: () = assert!(offset_of!(FlowStart, dport) == 26);
const _: () = assert!(offset_of!(FlowStart, saddr) == 32);
const _: () = assert!(offset_of!(FlowStart, daddr) == 48);
const _: () = plain_bytes::<FlowStart>();
// SAFETY: as for `Watch`: repr(C), no implicit padding (IntoBytes), any
// bit pattern valid (FromBytes).
unsafe impl aya::Pod for FlowStart {}

/// `struct event_head`: how every ring record starts.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct EventHead {
    /// One of [`kind`].
    pub kind: u32,
    pub pid: u32,
    pub cgroup: u64,
    pub time_ns: u64,
}
const _: () = assert!(size_of::<EventHead>() == 24);
const _: () = assert!(offset_of!(EventHead, kind) == 0);
const _: () = assert!(offset_of!(EventHead, pid) == 4);
const _: () = assert!(offset_of!(EventHead, cgroup) == 8);
const _: () = assert!(offset_of!(EventHead, time_ns) == 16);

/// `struct exec_event`, always sent whole.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct ExecEvent {
    pub head: EventHead,
    /// Bytes of `args` read from argv (at most [`ARGS_LEN`]).
    pub args_len: u32,
    pub pad: u32,
    /// NUL-terminated unless it fills the array.
    pub path: [u8; PATH_LEN],
    /// argv, NUL-separated.
    pub args: [u8; ARGS_LEN],
}
const _: () = assert!(size_of::<ExecEvent>() == 32 + PATH_LEN + ARGS_LEN);
const _: () = assert!(offset_of!(ExecEvent, args_len) == 24);
const _: () = assert!(offset_of!(ExecEvent, path) == 32);
const _: () = assert!(offset_of!(ExecEvent, args) == 32 + PATH_LEN);

/// `struct open_head`: the part of an open record always sent; the path
/// follows, cut after its NUL.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct OpenHead {
    pub head: EventHead,
    /// The open flags (`O_*`).
    pub flags: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<OpenHead>() == 32);
const _: () = assert!(offset_of!(OpenHead, flags) == 24);

/// `struct open_event`: an open record at its largest, as the kernel builds
/// it in [`SampleState::scratch`].
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct OpenEvent {
    pub open: OpenHead,
    pub path: [u8; PATH_LEN],
}
const _: () = assert!(size_of::<OpenEvent>() == 32 + PATH_LEN);
const _: () = assert!(offset_of!(OpenEvent, path) == 32);

/// `struct oom_event`: the head alone, whose pid is the victim's.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct OomEvent {
    pub head: EventHead,
}
const _: () = assert!(size_of::<OomEvent>() == 24);

/// `struct refused_event`: a syscall returned EPERM or ENOSYS.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct RefusedEvent {
    pub head: EventHead,
    pub nr: u32,
    pub ret: i32,
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<RefusedEvent>() == 48);
const _: () = assert!(offset_of!(RefusedEvent, nr) == 24);
const _: () = assert!(offset_of!(RefusedEvent, comm) == 32);

/// `struct flow_event`: a TCP connection, at its close. Ports in host
/// order; addresses in network order, IPv4 in the first 4 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct FlowEvent {
    pub head: EventHead,
    pub outbound: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub pad: u16,
    pub pad2: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}
const _: () = assert!(size_of::<FlowEvent>() == 96);
const _: () = assert!(offset_of!(FlowEvent, outbound) == 24);
const _: () = assert!(offset_of!(FlowEvent, family) == 28);
const _: () = assert!(offset_of!(FlowEvent, sport) == 30);
const _: () = assert!(offset_of!(FlowEvent, dport) == 32);
const _: () = assert!(offset_of!(FlowEvent, bytes_in) == 40);
const _: () = assert!(offset_of!(FlowEvent, bytes_out) == 48);
const _: () = assert!(offset_of!(FlowEvent, duration_ns) == 56);
const _: () = assert!(offset_of!(FlowEvent, saddr) == 64);
const _: () = assert!(offset_of!(FlowEvent, daddr) == 80);

/// `AF_INET`, [`FlowEvent::family`] of an IPv4 connection.
pub(crate) const AF_INET: u16 = 2;

/// `struct sample_state`: per-CPU value of the `sampled` map. Only `out`
/// (opens left out by sampling) is the agent's; the rest is the sampler's.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct SampleState {
    pub out: u64,
    pub seq: u64,
    pub seen: u64,
    pub unread: u64,
    /// Where the kernel builds an open record.
    pub scratch: OpenEvent,
}
const _: () = assert!(size_of::<SampleState>() == 32 + size_of::<OpenEvent>());
const _: () = assert!(offset_of!(SampleState, out) == 0);
const _: () = assert!(offset_of!(SampleState, scratch) == 32);
const _: () = plain_bytes::<SampleState>();
// SAFETY: as for `Watch`: repr(C), no implicit padding (IntoBytes), any
// bit pattern valid (FromBytes).
unsafe impl aya::Pod for SampleState {}

#[cfg(test)]
mod tests {
    use zerocopy::FromZeros;

    use super::*;

    #[test]
    fn syscall_counts_list_only_entered_syscalls() {
        let mut c = SyscallCounts::new_zeroed();
        c.n[0] = 3;
        c.n[257] = 12;
        c.n[NR_SYSCALLS - 1] = 1;
        c.compat[20] = 2;
        assert_eq!(
            c.to_map().into_iter().collect::<Vec<_>>(),
            [
                (0, 3),
                (257, 12),
                (NR_SYSCALLS as u32 - 1, 1),
                (20 | crate::COMPAT, 2)
            ]
        );
        assert_eq!(c.total(), 18);
    }
}
