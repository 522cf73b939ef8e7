//! NRI's `LinuxSeccomp` and the OCI JSON profile, both ways, and the
//! profile kind NRI 0.10+ reports (RuntimeDefault, Unconfined, Localhost).

use hyperbox_nri_proto::api;
use serde_json::{Value, json};

use super::profile::SpecKind;

/// The OCI JSON of an NRI profile.
pub fn to_json(p: &api::LinuxSeccomp) -> Value {
    let mut o = json!({
        "defaultAction": p.default_action,
        "architectures": p.architectures,
        "syscalls": p.syscalls.iter().map(|s| {
            let mut r = json!({ "names": s.names, "action": s.action });
            if let Some(e) = &s.errno_ret {
                r["errnoRet"] = json!(e.value);
            }
            if !s.args.is_empty() {
                r["args"] = s.args.iter().map(|a| json!({
                    "index": a.index, "value": a.value, "valueTwo": a.value_two, "op": a.op,
                })).collect();
            }
            r
        }).collect::<Vec<_>>(),
    });
    if let Some(e) = &p.default_errno {
        o["defaultErrnoRet"] = json!(e.value);
    }
    if !p.flags.is_empty() {
        o["flags"] = json!(p.flags);
    }
    o
}

/// An OCI JSON profile as NRI's adjustment (argument conditions kept;
/// `defaultErrnoRet` dropped, which containerd 2.4's NRI would drop
/// anyway: SCMP_ACT_ERRNO alone is EPERM).
pub fn from_json(v: &Value) -> api::LinuxSeccomp {
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let errno = |v: Option<&Value>| {
        v.and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .map(|value| api::OptionalUInt32 { value })
    };
    api::LinuxSeccomp {
        default_action: v["defaultAction"].as_str().unwrap_or_default().to_string(),
        default_errno: None,
        architectures: strings(v.get("architectures")),
        flags: strings(v.get("flags")),
        listener_path: String::new(),
        listener_metadata: String::new(),
        syscalls: v
            .get("syscalls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|r| api::LinuxSyscall {
                names: strings(r.get("names")),
                action: r["action"].as_str().unwrap_or_default().to_string(),
                errno_ret: errno(r.get("errnoRet")),
                args: r
                    .get("args")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|a| api::LinuxSeccompArg {
                        index: a["index"].as_u64().unwrap_or(0) as u32,
                        value: a["value"].as_u64().unwrap_or(0),
                        value_two: a["valueTwo"].as_u64().unwrap_or(0),
                        op: a["op"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The kind NRI reports, when it reports one (NRI 0.10+); else the spec's
/// profile decides as on the shim's path.
pub fn kind(c: &api::Container, spec: Option<&Value>) -> SpecKind {
    let reported = c.linux.as_ref().and_then(|l| l.seccomp_profile.as_ref());
    match reported.map(|p| p.profile_type) {
        Some(api::PROFILE_RUNTIME_DEFAULT) => SpecKind::RuntimeDefault,
        Some(api::PROFILE_LOCALHOST) => SpecKind::Localhost,
        Some(_) => SpecKind::Unconfined,
        None => SpecKind::of_spec(spec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_survives_the_trip_through_nri() {
        let p = json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64"],
            "flags": ["SECCOMP_FILTER_FLAG_LOG"],
            "syscalls": [
                {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
            ],
        });
        assert_eq!(to_json(&from_json(&p)), p);
    }
}
