//! Container annotations hyperbox reads (set by users in pod specs or with
//! `ctr --annotation`/`nerdctl --annotation`) and writes (so a restarted
//! agent, or an operator with `crictl inspect`, can see what it decided).
//! docs/design.md §5: add keys, never rename them.

/// Picks a container's memory policy (`off`, `observe`, `learn`, `enforce`…).
pub const MEMORY_POLICY: &str = "memory.hyperbox.dev/policy";
/// Overrides a container's workload key (learning is per workload).
pub const WORKLOAD: &str = "hyperbox.dev/workload";
/// Picks a container's seccomp mode (`off`, `learn`, `complain`, `enforce`,
/// `auto`).
pub const SECCOMP_MODE: &str = "seccomp.hyperbox.dev/mode";
/// Turns the eBPF tracer on or off for one container (`true`/`false`).
pub const TRACE_ENABLED: &str = "trace.hyperbox.dev/enabled";
/// How long a container's syscalls are counted from its start, in seconds;
/// `0` counts its whole life.
pub const TRACE_SYSCALL_WINDOW: &str = "trace.hyperbox.dev/syscall-window-secs";
/// Written by the agent: the memory decision it took at creation.
pub const MEMORY_DECISION: &str = "memory.hyperbox.dev/decision";
/// Written by the agent beside a limit it set: the limit the user asked for
/// (bytes, or `none`), so an agent restarted later knows its ceiling.
pub const MEMORY_USER_LIMIT: &str = "memory.hyperbox.dev/user-limit";
/// Written by the agent: the seccomp decision it took at creation (mode
/// in force and why), so `crictl inspect` shows it.
pub const SECCOMP_DECISION: &str = "seccomp.hyperbox.dev/decision";
