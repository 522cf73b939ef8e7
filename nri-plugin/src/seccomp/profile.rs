//! The OCI seccomp profile made from what a workload was seen to call,
//! its other shapes (a kubelet Localhost file, a Security Profiles
//! Operator `SeccompProfile`), and compiling any OCI profile with
//! libseccomp, as runc will, before it is installed.
//!
//! The profile allows the learned syscalls and the few runc itself makes
//! under the filter ([`RUNTIME_BASE`]). Everything else fails with EPERM,
//! except syscalls from Linux 5.1's numbering on (424 and up: clone3,
//! openat2, faccessat2, close_range…), which fail with ENOSYS: libcs take
//! ENOSYS for "kernel too old" and fall back to the older call, as
//! containerd's default profile arranges for clone3. Complaining profiles
//! default to `SCMP_ACT_LOG`: allowed, and audited by the kernel, which
//! the agent reads ([`super::audit`]). Enforcing ones carry no flags (runc
//! 1.1 refuses `flags`, so `SECCOMP_FILTER_FLAG_LOG` cannot ask the kernel
//! to audit denials): their denials are seen by the tracer instead, as
//! syscalls returning EPERM or ENOSYS that the profile does not allow.

use std::collections::BTreeSet;

use hyperbox_config::SeccompMode;
use libseccomp::{ScmpAction, ScmpArch, ScmpFilterContext, ScmpSyscall};
use serde_json::{Value, json};

use super::names::{self, Arch};

/// What runc 1.1 calls between installing a container's filter and
/// exec'ing the workload, which the tracer cannot see (it counts from the
/// first exec): without them the container dies before its first
/// instruction. Read from the kernel's audit of a container run under an
/// all-`SCMP_ACT_LOG` profile, with and without `noNewPrivileges` (runc
/// installs the filter before dropping capabilities in one case, just
/// before exec in the other), plus what the Go runtime in runc's init may
/// call at any moment (futex, signals, thread and memory management).
pub const RUNTIME_BASE: &[&str] = &[
    // runc's init after the filter: capabilities, ids, the exec fifo, the
    // working directory's check (runc 1.1.12+).
    "capget",
    "capset",
    "chdir",
    "close",
    "execve",
    "faccessat2",
    "fchdir",
    "fcntl",
    "fstat",
    "fstatfs",
    "getcwd",
    "getdents64",
    "getpid",
    "getppid",
    "newfstatat",
    "openat",
    "prctl",
    "read",
    "setgid",
    "setgroups",
    "setuid",
    "write",
    "epoll_ctl",
    // The Go runtime, at any moment.
    "clone",
    "epoll_pwait",
    "exit",
    "exit_group",
    "futex",
    "getrandom",
    "gettid",
    "madvise",
    "mmap",
    "mprotect",
    "munmap",
    "nanosleep",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sched_yield",
    "sigaltstack",
    "tgkill",
];

/// The first syscall number of Linux 5.1's unified numbering (the same on
/// every architecture): from here on, a syscall the profile does not
/// allow fails with ENOSYS.
pub const NEWER_FROM: u32 = 424;
/// Above every x86_64 syscall number in use (with room for new ones).
const NR_END: u32 = 512;
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// Errors of [`compile`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not the shape of an OCI `LinuxSeccomp`.
    #[error("not an OCI seccomp profile: {0}")]
    Shape(String),
    /// libseccomp refused it.
    #[error("libseccomp refuses {what}: {source}")]
    Refused {
        /// What was being added.
        what: String,
        /// libseccomp's error.
        #[source]
        source: libseccomp::error::SeccompError,
    },
}

/// A workload's learned syscalls, by name, per entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Learned {
    /// Through the 64-bit entry.
    pub syscalls: BTreeSet<String>,
    /// Through the 32-bit entry.
    pub compat: BTreeSet<String>,
}

/// The syscalls a profile made from `learned` allows, by name (the union
/// of both entries: OCI profiles name syscalls for all their
/// architectures at once).
pub fn allowed(learned: &Learned) -> BTreeSet<String> {
    let mut all: BTreeSet<String> = RUNTIME_BASE.iter().map(|s| s.to_string()).collect();
    all.extend(learned.syscalls.iter().cloned());
    all.extend(learned.compat.iter().cloned());
    all
}

/// The OCI `LinuxSeccomp` for `learned` in `mode` (`complain` logs what
/// is outside it; any other mode denies it).
pub fn oci(learned: &Learned, mode: SeccompMode) -> Value {
    let allow = allowed(learned);
    let mut arches = vec![Arch::X8664.oci()];
    if !learned.compat.is_empty() {
        arches.push(Arch::X86.oci());
    }
    if mode == SeccompMode::Complain {
        return json!({
            "defaultAction": "SCMP_ACT_LOG",
            "architectures": arches,
            "syscalls": [{ "names": allow, "action": "SCMP_ACT_ALLOW" }],
        });
    }
    let newer: Vec<String> = names::known(Arch::X8664, NEWER_FROM..NR_END)
        .into_iter()
        .filter(|n| !allow.contains(n))
        .collect();
    let mut syscalls = vec![json!({ "names": allow, "action": "SCMP_ACT_ALLOW" })];
    if !newer.is_empty() {
        syscalls.push(json!({ "names": newer, "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS }));
    }
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": arches,
        "syscalls": syscalls,
    })
}

/// `profile` as a kubelet `Localhost` profile file (the JSON containerd
/// reads from `/var/lib/kubelet/seccomp/…`): the same fields.
pub fn localhost(profile: &Value) -> Value {
    profile.clone()
}

/// `profile` as a Security Profiles Operator `SeccompProfile` object
/// named for `workload`.
pub fn spo(profile: &Value, workload: &str) -> Value {
    let mut spec = profile.clone();
    if let Some(m) = spec.as_object_mut() {
        // The operator's CRD has no defaultErrnoRet (EPERM is its default).
        m.remove("defaultErrnoRet");
    }
    json!({
        "apiVersion": "security-profiles-operator.x-k8s.io/v1beta1",
        "kind": "SeccompProfile",
        "metadata": {
            "name": object_name(workload),
            "annotations": { "hyperbox.dev/workload": workload },
        },
        "spec": spec,
    })
}

/// A Kubernetes object name (DNS-1123 subdomain) from a workload key.
pub fn object_name(workload: &str) -> String {
    let mut name: String = workload
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '.' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    name = name.trim_matches(|c| c == '-' || c == '.').to_string();
    name.truncate(253);
    if name.is_empty() {
        name = "hyperbox-workload".into();
    }
    name
}

/// What [`compile`] found in a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// Syscall names the profile allows (`SCMP_ACT_ALLOW` rules without
    /// argument conditions).
    pub allowed: BTreeSet<String>,
    /// Its default action (`SCMP_ACT_ERRNO`, `SCMP_ACT_LOG`…).
    pub default_action: String,
}

/// Compiles an OCI `LinuxSeccomp` with libseccomp as runc does (default
/// action, architectures, every rule and condition, down to the BPF
/// program), so a profile runc would refuse is never handed to it.
pub fn compile(profile: &Value) -> Result<Compiled, Error> {
    let shape = |m: &str| Error::Shape(m.to_string());
    let refused = |what: String| move |source| Error::Refused { what, source };
    let obj = profile.as_object().ok_or_else(|| shape("not an object"))?;
    let default_action = obj
        .get("defaultAction")
        .and_then(Value::as_str)
        .ok_or_else(|| shape("no defaultAction"))?;
    let errno = |v: Option<&Value>| -> Result<Option<i32>, Error> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| i32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| shape("errnoRet is not a small number")),
        }
    };
    let action = |name: &str, ret: Option<i32>| {
        // SCMP_ACT_ERRNO without errnoRet is EPERM, as in runc.
        let ret = ret.or((name == "SCMP_ACT_ERRNO").then_some(EPERM as i32));
        ScmpAction::from_str(name, ret).map_err(refused(format!("action {name}")))
    };
    let default = action(default_action, errno(obj.get("defaultErrnoRet"))?)?;
    let mut filter =
        ScmpFilterContext::new_filter(default).map_err(refused("a new filter".into()))?;
    for a in obj
        .get("architectures")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let a = a
            .as_str()
            .ok_or_else(|| shape("an architecture is not a string"))?;
        let arch: ScmpArch = a.parse().map_err(refused(format!("architecture {a}")))?;
        filter
            .add_arch(arch)
            .map_err(refused(format!("architecture {a}")))?;
    }
    let mut allowed = BTreeSet::new();
    for rule in obj
        .get("syscalls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let act_name = rule
            .get("action")
            .and_then(Value::as_str)
            .ok_or_else(|| shape("a syscalls entry has no action"))?;
        let act = action(act_name, errno(rule.get("errnoRet"))?)?;
        let args = rule.get("args").and_then(Value::as_array);
        let conditions = match args {
            Some(args) => args.iter().map(condition).collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        for n in rule
            .get("names")
            .and_then(Value::as_array)
            .ok_or_else(|| shape("a syscalls entry has no names"))?
        {
            let n = n
                .as_str()
                .ok_or_else(|| shape("a syscall name is not a string"))?;
            let sc = ScmpSyscall::from_name(n).map_err(refused(format!("syscall {n:?}")))?;
            // A rule equal to the default action is refused by libseccomp
            // and skipped by runc: skip it too.
            if act == default {
                continue;
            }
            let added = if conditions.is_empty() {
                filter.add_rule(act, sc)
            } else {
                filter.add_rule_conditional(act, sc, &conditions)
            };
            added.map_err(refused(format!("the rule for {n}")))?;
            if act == ScmpAction::Allow && conditions.is_empty() {
                allowed.insert(n.to_string());
            }
        }
    }
    let mut sink = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(|e| shape(&format!("open /dev/null: {e}")))?;
    filter
        .export_bpf(&mut sink)
        .map_err(refused("the BPF program".into()))?;
    Ok(Compiled {
        allowed,
        default_action: default_action.to_string(),
    })
}

fn condition(arg: &Value) -> Result<libseccomp::ScmpArgCompare, Error> {
    let shape = |m: &str| Error::Shape(m.to_string());
    let index = arg
        .get("index")
        .and_then(Value::as_u64)
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| shape("an argument has no index"))?;
    let value = arg.get("value").and_then(Value::as_u64).unwrap_or(0);
    let op = arg
        .get("op")
        .and_then(Value::as_str)
        .ok_or_else(|| shape("an argument has no op"))?;
    let op = match op {
        "SCMP_CMP_NE" => libseccomp::ScmpCompareOp::NotEqual,
        "SCMP_CMP_LT" => libseccomp::ScmpCompareOp::Less,
        "SCMP_CMP_LE" => libseccomp::ScmpCompareOp::LessOrEqual,
        "SCMP_CMP_EQ" => libseccomp::ScmpCompareOp::Equal,
        "SCMP_CMP_GE" => libseccomp::ScmpCompareOp::GreaterEqual,
        "SCMP_CMP_GT" => libseccomp::ScmpCompareOp::Greater,
        "SCMP_CMP_MASKED_EQ" => libseccomp::ScmpCompareOp::MaskedEqual(value),
        other => return Err(shape(&format!("unknown argument op {other}"))),
    };
    let datum = if matches!(op, libseccomp::ScmpCompareOp::MaskedEqual(_)) {
        arg.get("valueTwo").and_then(Value::as_u64).unwrap_or(0)
    } else {
        value
    };
    Ok(libseccomp::ScmpArgCompare::new(index, op, datum))
}

/// How a container's spec profile was set, as far as hyperbox can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecKind {
    /// No profile (Kubernetes `Unconfined`, or `ctr` without `--seccomp`).
    Unconfined,
    /// The runtime's default (Kubernetes `RuntimeDefault`, nerdctl's and
    /// `ctr --seccomp`'s).
    RuntimeDefault,
    /// One the user wrote (Kubernetes `Localhost`).
    Localhost,
}

impl SpecKind {
    /// For reasons and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SpecKind::Unconfined => "unconfined",
            SpecKind::RuntimeDefault => "runtime default",
            SpecKind::Localhost => "user-set (localhost)",
        }
    }

    /// Tells the kind from the spec's profile alone (the shim's path,
    /// where nothing says how it was chosen): containerd's default profile
    /// denies with EPERM by default and allows about 300 syscalls or more;
    /// a profile hyperbox installed says so in its flags and size; any
    /// other is the user's.
    pub fn of_spec(profile: Option<&Value>) -> SpecKind {
        let Some(p) = profile.filter(|p| !p.is_null()) else {
            return SpecKind::Unconfined;
        };
        let errno = p.get("defaultAction").and_then(Value::as_str) == Some("SCMP_ACT_ERRNO");
        let allowed = allowed_names(p).len();
        if errno && allowed >= DEFAULT_PROFILE_MIN {
            SpecKind::RuntimeDefault
        } else {
            SpecKind::Localhost
        }
    }
}

/// Fewer allowed syscalls than containerd's default profile has for a
/// container without extra capabilities (about 300 names on x86_64).
const DEFAULT_PROFILE_MIN: usize = 250;

/// Allowed syscall names of any OCI profile (`SCMP_ACT_ALLOW` rules
/// without conditions).
pub fn allowed_names(profile: &Value) -> BTreeSet<String> {
    allow_rules(profile, false)
}

/// Syscall names any OCI profile allows at all, some only with argument
/// conditions (containerd's default allows `clone` without namespace
/// flags, `personality` with a few personas): what a workload comparing
/// itself with the profile may call.
pub fn permitted_names(profile: &Value) -> BTreeSet<String> {
    allow_rules(profile, true)
}

fn allow_rules(profile: &Value, conditional: bool) -> BTreeSet<String> {
    profile
        .get("syscalls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|r| r.get("action").and_then(Value::as_str) == Some("SCMP_ACT_ALLOW"))
        .filter(|r| {
            conditional
                || r.get("args")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty)
        })
        .filter_map(|r| r.get("names").and_then(Value::as_array))
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learned(names: &[&str]) -> Learned {
        Learned {
            syscalls: names.iter().map(|s| s.to_string()).collect(),
            compat: BTreeSet::new(),
        }
    }

    #[test]
    fn an_enforcing_profile_allows_what_was_learned_and_runc_needs_and_compiles() {
        let p = oci(
            &learned(&["accept4", "bind", "listen"]),
            SeccompMode::Enforce,
        );
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(p["architectures"], json!(["SCMP_ARCH_X86_64"]));
        let c = compile(&p).expect("compiles");
        assert!(c.allowed.contains("accept4") && c.allowed.contains("execve"));
        assert!(!c.allowed.contains("unshare") && !c.allowed.contains("ptrace"));
        // clone3 is newer than the numbering cut: ENOSYS, so libc falls back.
        let enosys = &p["syscalls"][1];
        assert_eq!(enosys["errnoRet"], 38);
        assert!(
            enosys["names"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == "clone3")
        );
        // faccessat2 is runc's: allowed, so not in the ENOSYS list.
        assert!(
            !enosys["names"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == "faccessat2")
        );
    }

    #[test]
    fn a_complaining_profile_logs_instead_of_denying() {
        let p = oci(&learned(&["read"]), SeccompMode::Complain);
        assert_eq!(p["defaultAction"], "SCMP_ACT_LOG");
        compile(&p).expect("compiles");
    }

    #[test]
    fn a_32_bit_syscall_learned_adds_the_x86_architecture() {
        let mut l = learned(&["read"]);
        l.compat.insert("socketcall".into());
        let p = oci(&l, SeccompMode::Enforce);
        assert_eq!(
            p["architectures"],
            json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"])
        );
        compile(&p).expect("socketcall exists on x86");
    }

    #[test]
    fn libseccomp_refuses_what_runc_would() {
        let bogus = oci(&learned(&["not_a_syscall"]), SeccompMode::Enforce);
        let e = compile(&bogus).unwrap_err().to_string();
        assert!(e.contains("not_a_syscall"), "{e}");
        let bad_arch =
            json!({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_VAX"]});
        assert!(compile(&bad_arch).is_err());
        let bad_action = json!({"defaultAction": "SCMP_ACT_MAYBE"});
        assert!(compile(&bad_action).is_err());
        assert!(compile(&json!("profile")).is_err());
    }

    #[test]
    fn the_runtime_default_is_told_from_a_users_profile() {
        assert_eq!(SpecKind::of_spec(None), SpecKind::Unconfined);
        let many: Vec<String> = names::known(Arch::X8664, 0..300);
        let default = json!({"defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": many, "action": "SCMP_ACT_ALLOW"}]});
        assert_eq!(SpecKind::of_spec(Some(&default)), SpecKind::RuntimeDefault);
        let ours = oci(&learned(&["read"]), SeccompMode::Enforce);
        assert_eq!(SpecKind::of_spec(Some(&ours)), SpecKind::Localhost);
    }

    #[test]
    fn exported_shapes_carry_the_same_rules() {
        let p = oci(&learned(&["read"]), SeccompMode::Enforce);
        let s = spo(&p, "default/web@registry.local/web");
        assert_eq!(s["kind"], "SeccompProfile");
        assert_eq!(s["metadata"]["name"], "default-web-registry.local-web");
        assert_eq!(s["spec"]["syscalls"], p["syscalls"]);
        assert_eq!(localhost(&p), p);
        assert_eq!(allowed_names(&p), allowed(&learned(&["read"])));
        // A conditional allow is permitted, not allowed outright.
        let cond = serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO"}
            ]
        });
        assert_eq!(allowed_names(&cond), BTreeSet::from(["read".to_string()]));
        assert_eq!(
            permitted_names(&cond),
            BTreeSet::from(["clone".to_string(), "read".to_string()])
        );
    }
}
