// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// hyperbox per-container tracer: syscall counts, execs, opens, TCP flows
// and OOM kills for the cgroups the agent watches. Built by build.rs with clang -target bpf.
//
// Compiled once, relocated at load time against the running kernel's BTF
// (CO-RE): the few kernel structs we read are declared below with
// preserve_access_index instead of a generated vmlinux.h, so the build
// needs no kernel headers and field offsets come from the target kernel.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "records.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define MAX_WATCHED 4096

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7
#define AF_INET 2
#define AF_INET6 10

#define NR_OPEN 2
#define NR_OPENAT 257

struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
} __attribute__((preserve_access_index));

struct css_set;
struct cgroup;

// `status` & TS_COMPAT: the task is in a 32-bit syscall (x86).
struct thread_info {
	__u32 status;
} __attribute__((preserve_access_index));
#define TS_COMPAT 0x0002

struct task_struct {
	struct thread_info thread_info;
	struct mm_struct *mm;
	struct css_set *cgroups;
	int tgid;
} __attribute__((preserve_access_index));

struct linux_binprm {
	const char *filename;
} __attribute__((preserve_access_index));

// x86_64 syscall arguments (the build targets x86_64; see build.rs).
struct pt_regs {
	unsigned long di;
	unsigned long si;
	unsigned long dx;
	unsigned long ax;
	unsigned long orig_ax;
} __attribute__((preserve_access_index));

#define EPERM 1
#define ENOSYS 38

struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));

struct cgroup {
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));

struct cgroup_subsys_state {
	struct cgroup *cgroup;
} __attribute__((preserve_access_index));

struct css_set {
	struct cgroup_subsys_state *subsys[1];
	struct cgroup *dfl_cgrp;
} __attribute__((preserve_access_index));

struct in6_addr {
	union {
		__u8 u6_addr8[16];
	} in6_u;
} __attribute__((preserve_access_index));

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct sock_cgroup_data {
	struct cgroup *cgroup;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	struct sock_cgroup_data sk_cgrp_data;
} __attribute__((preserve_access_index));

struct tcp_sock {
	__u64 bytes_received;
	__u64 bytes_acked;
} __attribute__((preserve_access_index));


// Set by the loader before loading (aya override_global).
// Pure cgroup v1 hosts: 1 + the index of the v1 controller whose cgroup
// identifies a container (memory); 0 on hosts with a v2 hierarchy, where
// the v2 cgroup id is used.
volatile const __u32 hb_v1_subsys = 0;
// Sampling of open events under pressure: once the ring buffer holds more
// than hb_sample_above unread bytes, only one open in hb_sample_one_in
// per CPU is sent; the others are counted in `sampled`.
volatile const __u64 hb_sample_above = 128 * 1024;
volatile const __u32 hb_sample_one_in = 16;
// Opens wake the agent only once this many bytes are unread, as seen at
// the periodic look (LOOK_EVERY); the agent also drains the ring on a
// short timer. A wake-up per event costs the producer more than the event
// itself. Execs, connections and OOM kills wake it at once.
volatile const __u64 hb_wakeup_above = 16 * 1024;

// The traced containers, by cgroup id (struct watch in records.h).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_WATCHED);
	__type(key, __u64);
	__type(value, struct watch);
} watched SEC(".maps");

// Pure v1 hosts: per container and syscall number, how many times it was
// entered (sized to 1 entry by the loader on hosts with v2).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct syscall_key);
	__type(value, __u64);
} syscalls SEC(".maps");

// UAPI value of BPF_MAP_TYPE_CGRP_STORAGE (kernel 6.2); Debian 12's
// linux-libc-dev headers are 6.1 and lack the name.
#define HB_MAP_TYPE_CGRP_STORAGE 32

// v2 (hybrid included): the counts live in the watched cgroup's own local
// storage, created by the agent at watch. One lookup, no hashing, finds
// both whether the task's container is watched and its counters; this is
// the hot path of every syscall on the node while anything is traced.
struct {
	__uint(type, HB_MAP_TYPE_CGRP_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct syscall_counts);
} counts SEC(".maps");

// v2: a watched cgroup's counts as they were when it was removed (runc
// deletes the cgroup as soon as the container is deleted, which can be
// before the agent hears the container stopped; its local storage goes
// with it). The agent reads and deletes the entry.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct syscall_counts);
} removed SEC(".maps");

// Open connections of watched containers, by socket address, from
// connect/accept to close (struct flow_start in records.h). The close is
// reported even when the container was unwatched meanwhile (its processes
// are killed at stop, and the sockets close after). The addresses are
// taken at ESTABLISHED: at SYN_SENT the local port is not chosen yet, and
// at CLOSE the kernel has already released it.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct flow_start);
} flows SEC(".maps");

// Size is set from user space (tracing.ring_buffer_bytes) before loading.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

// Events lost because the ring buffer was full, per CPU.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

// Per CPU, the sampler of open events (struct sample_state in records.h).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sample_state);
} sampled SEC(".maps");

// Opens look at the ring's fill once in this many per CPU. The query reads
// the reader's position, a cache line the agent writes from the other CPU;
// made twice per open (for sampling and for the wake-up) it was the
// costliest part of an open event in a perf profile of the copy workload.
#define LOOK_EVERY 32

static __always_inline void count_drop(__u64 cg);

// Whether to leave this open out: the ring is filling faster than the
// agent reads, so keep one in hb_sample_one_in and count the rest. Sets
// *wake when this open should wake the reader.
static __always_inline int sample_out(struct sample_state *st, int *wake)
{
	if (st->seen++ % LOOK_EVERY == 0) {
		st->unread = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
		*wake = st->unread >= hb_wakeup_above;
	}
	if (st->unread <= hb_sample_above)
		return 0;
	st->seq += 1;
	if (hb_sample_one_in <= 1 || st->seq % hb_sample_one_in == 0)
		return 0;
	st->out += 1;
	return 1;
}

// The cgroup id that identifies the current task's container: the v2 id,
// or on pure v1 hosts the id of its cgroup in the chosen v1 controller.
static __always_inline __u64 task_cgroup_v1(struct task_struct *task)
{
	struct css_set *cset = BPF_CORE_READ(task, cgroups);
	struct cgroup_subsys_state *css = 0;
	__u32 idx = (hb_v1_subsys - 1) & 15;
	bpf_probe_read_kernel(&css, sizeof(css), &cset->subsys[0] + idx);
	if (!css)
		return 0;
	return BPF_CORE_READ(css, cgroup, kn, id);
}

static __always_inline __u64 current_cgroup(void)
{
	if (hb_v1_subsys == 0)
		return bpf_get_current_cgroup_id();
	return task_cgroup_v1((struct task_struct *)bpf_get_current_task());
}

// An open of a watched container: the path as the caller passed it (the
// user's string, read before the kernel resolves it) and the flags.
// `btf_regs`: regs is a BTF pointer the verifier lets the program load
// from directly (tp_btf, fentry), not a raw tracepoint's plain address.
// The event is built in per-CPU scratch and copied to the ring with only
// the path's used bytes: a typical path is a fifth of PATH_LEN, so the
// ring holds several times more opens and the agent reads that much less
// memory written by another CPU.
static __always_inline void emit_open(struct pt_regs *regs, __u64 cg, __u32 nr, int btf_regs)
{
	__u32 zero = 0;
	struct sample_state *st = bpf_map_lookup_elem(&sampled, &zero);
	if (!st)
		return;
	int wake = 0;
	if (sample_out(st, &wake)) {
		struct watch *w = bpf_map_lookup_elem(&watched, &cg);
		if (w)
			__sync_fetch_and_add(&w->sampled, 1);
		return;
	}
	struct open_event *e = &st->scratch;
	const char *path;
	if (btf_regs) {
		path = (const char *)(nr == NR_OPENAT ? regs->si : regs->di);
		e->open.flags = (__u32)(nr == NR_OPENAT ? regs->dx : regs->si);
	} else if (nr == NR_OPENAT) {
		path = (const char *)BPF_CORE_READ(regs, si);
		e->open.flags = (__u32)BPF_CORE_READ(regs, dx);
	} else {
		path = (const char *)BPF_CORE_READ(regs, di);
		e->open.flags = (__u32)BPF_CORE_READ(regs, si);
	}
	e->open.head.kind = EVENT_OPEN;
	e->open.head.pid = bpf_get_current_pid_tgid() >> 32;
	e->open.head.cgroup = cg;
	e->open.head.time_ns = bpf_ktime_get_ns();
	e->open.pad = 0;
	// The length includes the NUL; an unreadable path is sent empty.
	long len = bpf_probe_read_user_str(e->path, sizeof(e->path), path);
	if (len < 1) {
		e->path[0] = 0;
		len = 1;
	}
	__u64 size = sizeof(struct open_head) + (__u64)len;
	if (size > sizeof(*e))
		size = sizeof(*e);
	if (bpf_ringbuf_output(&events, e, size, wake ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP) != 0)
		count_drop(cg);
}

// Counts a syscall of a watched v2 cgroup in its local storage, in the
// kernel (so counting never drops), and sends opens to the ring buffer.
static __always_inline int count_syscall(struct pt_regs *regs, __u32 nr)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct cgroup *cgrp = task->cgroups->dfl_cgrp;
	struct syscall_counts *c = bpf_cgrp_storage_get(&counts, cgrp, 0, 0);
	if (!c || !c->armed)
		return 0;
	if (task->thread_info.status & TS_COMPAT) {
		// i386 numbers: counted apart, and never an x86_64 open.
		if (nr < NR_SYSCALLS)
			__sync_fetch_and_add(&c->compat[nr], 1);
		return 0;
	}
	if (nr < NR_SYSCALLS)
		__sync_fetch_and_add(&c->n[nr], 1);
	if (nr == NR_OPENAT || nr == NR_OPEN)
		emit_open(regs, cgrp->kn->id, nr, 1);
	return 0;
}

// Counts a syscall of a watched cgroup on a pure v1 host (whose cgroups
// the task's css_set reaches only through pointers the verifier does not
// trust for local storage), in a hash by {cgroup id, nr}.
static __always_inline int count_syscall_v1(struct pt_regs *regs, __u32 nr)
{
	__u64 cg = current_cgroup();
	struct watch *w = bpf_map_lookup_elem(&watched, &cg);
	if (!w || !w->counting || !w->armed)
		return 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	int compat = BPF_CORE_READ(task, thread_info.status) & TS_COMPAT;
	if (compat && nr >= NR_SYSCALLS)
		return 0;
	struct syscall_key key = { .cgroup = cg, .nr = compat ? nr | COMPAT_BIT : nr };
	__u64 *count = bpf_map_lookup_elem(&syscalls, &key);
	if (count) {
		__sync_fetch_and_add(count, 1);
	} else {
		__u64 one = 1;
		// Another CPU may have inserted it meanwhile: then add to theirs.
		if (bpf_map_update_elem(&syscalls, &key, &one, BPF_NOEXIST) != 0) {
			count = bpf_map_lookup_elem(&syscalls, &key);
			if (count)
				__sync_fetch_and_add(count, 1);
		}
	}
	if (!compat && (nr == NR_OPENAT || nr == NR_OPEN))
		emit_open(regs, cg, nr, 0);
	return 0;
}

// Preferred hook: fentry on the x86_64 syscall dispatcher (6.9+). It runs
// on the syscall fast path; enabling the sys_enter tracepoint instead
// moves every syscall on the node to the slow path.
// Args: (const struct pt_regs *regs, unsigned int nr).
SEC("fentry/x64_sys_call")
int hb_sys_call(__u64 *ctx)
{
	return count_syscall((struct pt_regs *)ctx[0], (__u32)ctx[1]);
}

// Fallback hook where fentry cannot attach: the sys_enter tracepoint, as
// a BTF tracepoint (typed arguments: pt_regs, syscall number).
SEC("tp_btf/sys_enter")
int hb_sys_enter(__u64 *ctx)
{
	return count_syscall((struct pt_regs *)ctx[0], (__u32)ctx[1]);
}

// A syscall `nr` of the current task was refused with `ret` (-EPERM or
// -ENOSYS). If its cgroup reports refusals, each number is sent once
// (the bitmap in its storage): the agent keeps those the profile does
// not allow.
static __always_inline void report_refusal(__u32 nr, long ret)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct cgroup *cgrp = task->cgroups->dfl_cgrp;
	struct syscall_counts *c = bpf_cgrp_storage_get(&counts, cgrp, 0, 0);
	if (!c || !c->report)
		return;
	if (nr >= NR_SYSCALLS)
		return;
	int compat = task->thread_info.status & TS_COMPAT;
	__u32 bit = compat ? nr + NR_SYSCALLS : nr;
	__u64 mask = 1ULL << (bit & 63);
	__u32 word = bit >> 6;
	// Masked after a barrier: clang drops the mask as redundant (bit is
	// below 2 * NR_SYSCALLS), and the verifier cannot see that bound.
	asm volatile("" : "+r"(word));
	__u64 *seen = &c->refused[word & (2 * NR_SYSCALLS / 64 - 1)];
	// Read before the atomic: after its first refusal a number costs a
	// load, not a locked write to a line other CPUs share.
	if (*seen & mask)
		return;
	if (__sync_fetch_and_or(seen, mask) & mask)
		return;
	struct refused_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_drop(cgrp->kn->id);
		return;
	}
	e->head.kind = EVENT_REFUSED;
	e->head.pid = task->tgid;
	e->head.cgroup = cgrp->kn->id;
	e->head.time_ns = bpf_ktime_get_ns();
	e->nr = compat ? nr | COMPAT_BIT : nr;
	e->ret = (__s32)ret;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, 0);
}

// Preferred refusal hook: the seccomp filter itself returns. Only tasks
// under a seccomp filter call it, so unlike an exit tracepoint it costs
// no other task on the node anything (a trampoline per syscall for the
// filtered ones). It returns -1 when the filter skipped the syscall,
// having set the syscall's return value in the task's registers
// (-errno for SECCOMP_RET_ERRNO). Args: (int this_syscall, bool
// recheck_after_trace), or on older kernels (6.1) with a `const struct
// seccomp_data *` between them: the return value is fetched by helper,
// not read at a fixed slot, so the program loads on both.
SEC("fexit/__seccomp_filter")
int hb_seccomp_exit(__u64 *ctx)
{
	__u64 ret = 0;
	// Nearly every call allows its syscall: decided here, before any
	// other read.
	if (bpf_get_func_ret(ctx, &ret) != 0 || (int)ret != -1)
		return 0;
	struct pt_regs *regs =
		(struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	long err = (long)regs->ax;
	if (err != -EPERM && err != -ENOSYS)
		return 0;
	report_refusal((__u32)(int)ctx[0], err);
	return 0;
}

// Fallback refusal hook where fexit cannot attach (no BTF for the
// function, or the kernel inlined it): a syscall the filter denies never
// reaches sys_enter (seccomp runs first) but does come back through
// sys_exit, with the filter's errno. Enabling it moves every task on the
// node to the syscall slow path, so it is attached only while a
// reporting container is watched. tp_btf args: (struct pt_regs *regs,
// long ret).
SEC("tp_btf/sys_exit")
int hb_sys_exit(__u64 *ctx)
{
	long ret = (long)ctx[1];
	if (ret != -EPERM && ret != -ENOSYS)
		return 0;
	struct pt_regs *regs = (struct pt_regs *)ctx[0];
	report_refusal((__u32)regs->orig_ax, ret);
	return 0;
}

// Pure v1 hosts. raw_tracepoint args: [0] the caller's pt_regs, [1] the
// syscall number.
SEC("raw_tracepoint/sys_enter")
int hb_sys_enter_v1(struct bpf_raw_tracepoint_args *ctx)
{
	return count_syscall_v1((struct pt_regs *)ctx->args[0], (__u32)ctx->args[1]);
}

// An event of cgroup `cg` lost to a full ring: counted for the node and,
// while it is watched, for the container.
static __always_inline void count_drop(__u64 cg)
{
	__u32 zero = 0;
	__u64 *d = bpf_map_lookup_elem(&drops, &zero);
	if (d)
		*d += 1;
	struct watch *w = bpf_map_lookup_elem(&watched, &cg);
	if (w)
		__sync_fetch_and_add(&w->dropped, 1);
}

// exec: after the new image is in place, so current's mm holds the new
// argv. tp_btf args: (struct task_struct *p, pid_t old_pid,
// struct linux_binprm *bprm).
SEC("tp_btf/sched_process_exec")
int hb_exec(__u64 *ctx)
{
	__u64 cg = current_cgroup();
	struct watch *w = bpf_map_lookup_elem(&watched, &cg);
	if (!w)
		return 0;
	// The container's first exec (runc's init becoming the workload)
	// starts its syscall count.
	if (hb_v1_subsys == 0) {
		struct task_struct *cur = bpf_get_current_task_btf();
		struct syscall_counts *c =
			bpf_cgrp_storage_get(&counts, cur->cgroups->dfl_cgrp, 0, 0);
		if (c && !c->armed)
			c->armed = 1;
	} else if (!w->armed) {
		w->armed = 1;
	}
	struct exec_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_drop(cg);
		return 0;
	}
	struct task_struct *task = (struct task_struct *)ctx[0];
	struct linux_binprm *bprm = (struct linux_binprm *)ctx[2];
	e->head.kind = EVENT_EXEC;
	e->head.pid = BPF_CORE_READ(task, tgid);
	e->head.cgroup = cg;
	e->head.time_ns = bpf_ktime_get_ns();
	e->pad = 0;
	const char *filename = BPF_CORE_READ(bprm, filename);
	if (bpf_probe_read_kernel_str(e->path, sizeof(e->path), filename) < 0)
		e->path[0] = 0;
	unsigned long start = BPF_CORE_READ(task, mm, arg_start);
	unsigned long end = BPF_CORE_READ(task, mm, arg_end);
	unsigned long len = end - start;
	if (len > ARGS_LEN)
		len = ARGS_LEN;
	e->args_len = 0;
	// argv sits at the top of the new stack, followed by the environment
	// and the file name; a short argv with a short environment can end
	// less than ARGS_LEN bytes before the top of the stack VMA, so read
	// exactly len bytes then (masked so the verifier sees the bound).
	if (end > start) {
		long err;
		if (len >= ARGS_LEN)
			err = bpf_probe_read_user(e->args, ARGS_LEN, (void *)start);
		else
			err = bpf_probe_read_user(e->args, len & (ARGS_LEN - 1), (void *)start);
		if (err == 0)
			e->args_len = len;
	}
	bpf_ringbuf_submit(e, 0);
	return 0;
}

// The OOM killer chose a victim: attribute it by the victim's own v2
// cgroup (the killer may run in another task's context).
// tp_btf args: (struct task_struct *task, uid_t uid).
// A cgroup is removed: keep a watched one's counts for the agent.
// tp_btf args: (struct cgroup *cgrp, const char *path).
SEC("tp_btf/cgroup_rmdir")
int hb_cgroup_rmdir(__u64 *ctx)
{
	if (hb_v1_subsys != 0)
		return 0;
	struct cgroup *cgrp = (struct cgroup *)ctx[0];
	__u64 id = cgrp->kn->id;
	if (!bpf_map_lookup_elem(&watched, &id))
		return 0;
	struct syscall_counts *c = bpf_cgrp_storage_get(&counts, cgrp, 0, 0);
	if (c)
		bpf_map_update_elem(&removed, &id, c, BPF_ANY);
	return 0;
}

SEC("tp_btf/mark_victim")
int hb_oom(__u64 *ctx)
{
	struct task_struct *task = (struct task_struct *)ctx[0];
	__u64 cg = hb_v1_subsys == 0 ? BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id)
				      : task_cgroup_v1(task);
	if (!bpf_map_lookup_elem(&watched, &cg))
		return 0;
	struct oom_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_drop(cg);
		return 0;
	}
	e->head.kind = EVENT_OOM_KILL;
	e->head.pid = BPF_CORE_READ(task, tgid);
	e->head.cgroup = cg;
	e->head.time_ns = bpf_ktime_get_ns();
	bpf_ringbuf_submit(e, 0);
	return 0;
}

// TCP state changes, attributed by the socket's own v2 cgroup (set when
// the socket was created, and inherited by accepted sockets), since the
// change often runs in softirq context on behalf of no task of ours. On
// pure v1 hosts a socket has no container cgroup: connects (process
// context) are attributed by the calling task, accepts are not seen.
// tp_btf args: (const struct sock *sk, int oldstate, int newstate).
// Local and remote address and port of a socket, as the flow reports them.
static __always_inline void sock_addrs(struct sock *sk, __u16 family, __u16 *sport, __u16 *dport,
				       __u8 *saddr, __u8 *daddr)
{
	*sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	*dport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	__builtin_memset(saddr, 0, 16);
	__builtin_memset(daddr, 0, 16);
	if (family == AF_INET) {
		__be32 s = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__be32 d = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(saddr, &s, 4);
		__builtin_memcpy(daddr, &d, 4);
	} else {
		bpf_core_read(saddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(daddr, 16, &sk->__sk_common.skc_v6_daddr);
	}
}

SEC("tp_btf/inet_sock_set_state")
int hb_tcp(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	int oldstate = (int)ctx[1];
	int newstate = (int)ctx[2];
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	__u64 key = (__u64)sk;
	if (newstate == TCP_SYN_SENT ||
	    (newstate == TCP_ESTABLISHED && oldstate == TCP_SYN_RECV)) {
		__u64 cg;
		if (hb_v1_subsys == 0)
			cg = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
		else if (newstate == TCP_SYN_SENT)
			cg = current_cgroup();
		else
			return 0;
		if (!bpf_map_lookup_elem(&watched, &cg))
			return 0;
		struct flow_start f = {
			.time_ns = bpf_ktime_get_ns(),
			.cgroup = cg,
			.outbound = newstate == TCP_SYN_SENT,
		};
		if (newstate == TCP_ESTABLISHED) {
			f.established = 1;
			sock_addrs(sk, family, &f.sport, &f.dport, f.saddr, f.daddr);
		}
		bpf_map_update_elem(&flows, &key, &f, BPF_ANY);
		return 0;
	}
	struct flow_start *f = bpf_map_lookup_elem(&flows, &key);
	if (!f)
		return 0;
	if (newstate == TCP_ESTABLISHED) {
		// A connect went through: now its local port is known.
		f->established = 1;
		sock_addrs(sk, family, &f->sport, &f->dport, f->saddr, f->daddr);
		return 0;
	}
	if (newstate != TCP_CLOSE)
		return 0;
	struct flow_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_drop(f->cgroup);
		bpf_map_delete_elem(&flows, &key);
		return 0;
	}
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	__u64 now = bpf_ktime_get_ns();
	e->head.kind = EVENT_FLOW;
	e->head.pid = 0;
	e->head.cgroup = f->cgroup;
	e->head.time_ns = now;
	e->outbound = f->outbound;
	e->family = family;
	e->pad = 0;
	e->pad2 = 0;
	if (f->established) {
		e->sport = f->sport;
		e->dport = f->dport;
		__builtin_memcpy(e->saddr, f->saddr, 16);
		__builtin_memcpy(e->daddr, f->daddr, 16);
	} else {
		// Never established (refused, timed out): what the socket still
		// knows, the remote end.
		sock_addrs(sk, family, &e->sport, &e->dport, e->saddr, e->daddr);
	}
	e->bytes_in = BPF_CORE_READ(tp, bytes_received);
	e->bytes_out = BPF_CORE_READ(tp, bytes_acked);
	e->duration_ns = now - f->time_ns;
	bpf_ringbuf_submit(e, 0);
	bpf_map_delete_elem(&flows, &key);
	return 0;
}
