// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Every record that crosses the kernel/user boundary: map keys and values
// the agent reads or writes, and the event records of the ring buffer.
//
// The agent reads these bytes through the #[repr(C)] mirrors in
// bpf/src/records.rs. Both sides assert the same sizes and offsets, so a
// field added, moved or resized here fails the build until the mirror
// follows. The asserts hold on the BPF target (tracer.bpf.c includes this
// file) and on the host (build.rs also compiles this file alone), whose
// C layout is the one Rust's repr(C) uses.
//
// Padding is always an explicit field, written as zero: the kernel copies
// records byte for byte, and an implicit hole would carry stale bytes.

#ifndef HB_RECORDS_H
#define HB_RECORDS_H

#include <linux/types.h>

#define PATH_LEN 256
#define ARGS_LEN 128
#define NR_SYSCALLS 512

#define HB_ASSERT_SIZE(type, n)                                                                    \
	_Static_assert(sizeof(struct type) == (n),                                                 \
		       "struct " #type " must be " #n " bytes, as bpf/src/records.rs says")
#define HB_ASSERT_OFFSET(type, field, n)                                                           \
	_Static_assert(__builtin_offsetof(struct type, field) == (n),                              \
		       "struct " #type "." #field " must be at byte " #n ", as bpf/src/records.rs says")

// The first field of every ring record.
enum event_kind {
	EVENT_EXEC = 1,
	EVENT_OPEN = 2,
	EVENT_OOM_KILL = 3,
	EVENT_FLOW = 4,
	EVENT_REFUSED = 5,
};

// Map `watched`, value (key: the cgroup id, __u64). A traced container.
// `counting`: 1 while its syscalls are counted (read on pure v1 hosts; on
// v2 the cgroup storage says it), 0 once counting stopped
// (tracing.syscall_window_secs) and only execs, connections and OOM kills
// are followed. `dropped`: its events lost to a full ring; `sampled`: its
// opens left out by sampling (the per-CPU node totals are in `drops` and
// `sampled`). Both only grow under pressure, so the atomic adds stay off
// the common path.
//
// `armed` (pure v1): 0 from watch until the container's first exec, while
// only runc runs in it (its setup is not the workload's); the syscall hook
// counts nothing before. On v2 the cgroup storage's own `armed` says it.
struct watch {
	__u32 counting;
	__u32 armed;
	__u64 dropped;
	__u64 sampled;
};
HB_ASSERT_SIZE(watch, 24);
HB_ASSERT_OFFSET(watch, counting, 0);
HB_ASSERT_OFFSET(watch, dropped, 8);
HB_ASSERT_OFFSET(watch, sampled, 16);

// Map `syscalls` (pure v1 hosts), key; the value is a __u64 count. `nr`
// has COMPAT_BIT set for a syscall entered through the 32-bit entry.
#define COMPAT_BIT (1u << 16)
struct syscall_key {
	__u64 cgroup;
	__u32 nr;
	__u32 pad;
};
HB_ASSERT_SIZE(syscall_key, 16);
HB_ASSERT_OFFSET(syscall_key, cgroup, 0);
HB_ASSERT_OFFSET(syscall_key, nr, 8);

// Map `counts` (cgroup v2 local storage), value: times each syscall
// number was entered through the 64-bit entry (`n`) and through the 32-bit
// one (`compat`, i386 numbers: int 0x80 or sysenter), counted only once
// `armed` (the container's first exec; see struct watch).
//
// `report`: set by the agent for a container under an installed seccomp
// profile: syscalls that return EPERM or ENOSYS are sent to the ring
// (EVENT_REFUSED), each number once (`refused`, a bitmap: 64-bit entry in
// the first NR_SYSCALLS bits, 32-bit entry after), for the agent to tell
// the profile's denials from the kernel's own refusals.
struct syscall_counts {
	__u32 armed;
	__u32 report;
	__u64 n[NR_SYSCALLS];
	__u64 compat[NR_SYSCALLS];
	__u64 refused[2 * NR_SYSCALLS / 64];
};
HB_ASSERT_SIZE(syscall_counts, 8 + 16 * NR_SYSCALLS + 2 * NR_SYSCALLS / 8);
HB_ASSERT_OFFSET(syscall_counts, n, 8);

// Map `flows`, value (key: the socket's address, __u64). A connection of
// a watched container, from connect/accept to close. IPv4 addresses are in
// the first 4 bytes of saddr/daddr, in network order; ports in host order.
struct flow_start {
	__u64 time_ns;
	__u64 cgroup;
	__u32 outbound;
	__u32 established;
	__u16 sport;
	__u16 dport;
	__u32 pad;
	__u8 saddr[16];
	__u8 daddr[16];
};
HB_ASSERT_SIZE(flow_start, 64);
HB_ASSERT_OFFSET(flow_start, time_ns, 0);
HB_ASSERT_OFFSET(flow_start, cgroup, 8);
HB_ASSERT_OFFSET(flow_start, outbound, 16);
HB_ASSERT_OFFSET(flow_start, established, 20);
HB_ASSERT_OFFSET(flow_start, sport, 24);
HB_ASSERT_OFFSET(flow_start, dport, 26);
HB_ASSERT_OFFSET(flow_start, saddr, 32);
HB_ASSERT_OFFSET(flow_start, daddr, 48);

// Every ring record starts like this.
struct event_head {
	__u32 kind;
	__u32 pid;
	__u64 cgroup;
	__u64 time_ns;
};
HB_ASSERT_SIZE(event_head, 24);
HB_ASSERT_OFFSET(event_head, kind, 0);
HB_ASSERT_OFFSET(event_head, pid, 4);
HB_ASSERT_OFFSET(event_head, cgroup, 8);
HB_ASSERT_OFFSET(event_head, time_ns, 16);

// EVENT_EXEC, always sent whole. `args`: the first args_len bytes of argv,
// NUL-separated.
struct exec_event {
	struct event_head head;
	__u32 args_len;
	__u32 pad;
	char path[PATH_LEN];
	char args[ARGS_LEN];
};
HB_ASSERT_SIZE(exec_event, 32 + PATH_LEN + ARGS_LEN);
HB_ASSERT_OFFSET(exec_event, args_len, 24);
HB_ASSERT_OFFSET(exec_event, path, 32);
HB_ASSERT_OFFSET(exec_event, args, 32 + PATH_LEN);

// EVENT_OPEN: what is always sent. The path follows, cut after its NUL
// (struct open_event), so the record is open_head plus 1..=PATH_LEN bytes.
struct open_head {
	struct event_head head;
	__u32 flags;
	__u32 pad;
};
HB_ASSERT_SIZE(open_head, 32);
HB_ASSERT_OFFSET(open_head, flags, 24);

struct open_event {
	struct open_head open;
	char path[PATH_LEN];
};
HB_ASSERT_SIZE(open_event, 32 + PATH_LEN);
HB_ASSERT_OFFSET(open_event, path, 32);

// EVENT_OOM_KILL: the head alone (pid: the victim).
struct oom_event {
	struct event_head head;
};
HB_ASSERT_SIZE(oom_event, 24);

// EVENT_REFUSED: a syscall of a reporting container returned EPERM or
// ENOSYS (the first time for its number). `nr` has COMPAT_BIT set for the
// 32-bit entry; `ret` is the negative errno; `comm` the caller's name.
struct refused_event {
	struct event_head head;
	__u32 nr;
	__s32 ret;
	char comm[16];
};
HB_ASSERT_SIZE(refused_event, 48);
HB_ASSERT_OFFSET(refused_event, nr, 24);
HB_ASSERT_OFFSET(refused_event, comm, 32);

// EVENT_FLOW: a TCP connection of a watched container, reported when it
// closes (head.pid is 0: the close runs on behalf of no task of ours).
// Addresses and ports as in struct flow_start.
struct flow_event {
	struct event_head head;
	__u32 outbound;
	__u16 family;
	__u16 sport;
	__u16 dport;
	__u16 pad;
	__u32 pad2;
	__u64 bytes_in;
	__u64 bytes_out;
	__u64 duration_ns;
	__u8 saddr[16];
	__u8 daddr[16];
};
HB_ASSERT_SIZE(flow_event, 96);
HB_ASSERT_OFFSET(flow_event, outbound, 24);
HB_ASSERT_OFFSET(flow_event, family, 28);
HB_ASSERT_OFFSET(flow_event, sport, 30);
HB_ASSERT_OFFSET(flow_event, dport, 32);
HB_ASSERT_OFFSET(flow_event, bytes_in, 40);
HB_ASSERT_OFFSET(flow_event, bytes_out, 48);
HB_ASSERT_OFFSET(flow_event, duration_ns, 56);
HB_ASSERT_OFFSET(flow_event, saddr, 64);
HB_ASSERT_OFFSET(flow_event, daddr, 80);

// Map `sampled`, per-CPU value, for open events: how many were left out by
// sampling (`out`, read by the agent), the 1-in-N sequence while sampling,
// how many were seen, the ring's unread bytes at the last look, and the
// event being built.
struct sample_state {
	__u64 out;
	__u64 seq;
	__u64 seen;
	__u64 unread;
	// Where an open event is built before it is copied to the ring with
	// only the path's used bytes (see emit_open). No other open can
	// overwrite it midway: the kernel never runs a program twice at once
	// on one CPU (its per-program recursion guard), and only one syscall
	// program is attached.
	struct open_event scratch;
};
HB_ASSERT_SIZE(sample_state, 32 + 32 + PATH_LEN);
HB_ASSERT_OFFSET(sample_state, out, 0);
HB_ASSERT_OFFSET(sample_state, scratch, 32);

#endif
