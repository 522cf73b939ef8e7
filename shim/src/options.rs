//! containerd's runtime options for a task, in the two shapes it sends
//! them: runc's `Options` (ctr, nerdctl, `runtimes.X.options` of type
//! runc) and the generic `runtimeoptions.v1.Options` CRI sends for a
//! runtime type it does not know, which names a config file.

use std::path::PathBuf;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::protobuf::{Message, UnknownValueRef};
use containerd_shim::protos::shim::oci::Options as RuncOptions;

/// What the shim takes from the options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runtime {
    /// runc binary (`BinaryName`).
    pub binary_name: String,
    /// runc's `--root` (`Root`).
    pub root: String,
    /// `--systemd-cgroup`.
    pub systemd_cgroup: bool,
    /// Owner of the stdio pipes.
    pub io_uid: u32,
    /// Group of the stdio pipes.
    pub io_gid: u32,
    /// `--no-pivot`.
    pub no_pivot_root: bool,
    /// `--no-new-keyring`.
    pub no_new_keyring: bool,
    /// Cgroup for the shim itself.
    pub shim_cgroup: String,
    /// hyperbox config file (`ConfigPath` of CRI's generic options).
    pub config_path: Option<PathBuf>,
}

/// Options that cannot be decoded.
#[derive(Debug, thiserror::Error)]
#[error("runtime options of type {type_url:?} cannot be decoded: {reason}")]
pub struct BadOptions {
    type_url: String,
    reason: String,
}

impl Runtime {
    /// From the `Any` of a `CreateTaskRequest` (absent: defaults).
    pub fn from_any(any: Option<&Any>) -> Result<Runtime, BadOptions> {
        let Some(any) = any else {
            return Ok(Runtime::default());
        };
        let bad = |reason: String| BadOptions {
            type_url: any.type_url.clone(),
            reason,
        };
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        match name {
            "" => Ok(Runtime::default()),
            "containerd.runc.v1.Options" | "io.containerd.runc.v2.Options" => {
                let o =
                    RuncOptions::parse_from_bytes(&any.value).map_err(|e| bad(e.to_string()))?;
                Ok(Runtime {
                    binary_name: o.binary_name,
                    root: o.root,
                    systemd_cgroup: o.systemd_cgroup,
                    io_uid: o.io_uid,
                    io_gid: o.io_gid,
                    no_pivot_root: o.no_pivot_root,
                    no_new_keyring: o.no_new_keyring,
                    shim_cgroup: o.shim_cgroup,
                    config_path: None,
                })
            }
            "runtimeoptions.v1.Options" => {
                // Fields: type_url = 1, config_path = 2, config_body = 3.
                let e = Empty::parse_from_bytes(&any.value).map_err(|e| bad(e.to_string()))?;
                let path = match e.special_fields.unknown_fields().get(2) {
                    Some(UnknownValueRef::LengthDelimited(b)) => {
                        Some(String::from_utf8(b.to_vec()).map_err(|e| bad(e.to_string()))?)
                    }
                    _ => None,
                };
                Ok(Runtime {
                    config_path: path.filter(|p| !p.is_empty()).map(PathBuf::from),
                    ..Default::default()
                })
            }
            other => Err(bad(format!("unknown options type {other:?}"))),
        }
    }

    /// From the serialized `Any` containerd writes to `start`'s stdin.
    pub fn from_any_bytes(raw: &[u8]) -> Result<Runtime, BadOptions> {
        if raw.is_empty() {
            return Ok(Runtime::default());
        }
        let any = Any::parse_from_bytes(raw).map_err(|e| BadOptions {
            type_url: String::new(),
            reason: e.to_string(),
        })?;
        Runtime::from_any(Some(&any))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_options_and_cri_generic_options_are_read() {
        let runc = RuncOptions {
            binary_name: "/usr/sbin/runc".into(),
            io_uid: 1000,
            systemd_cgroup: true,
            ..Default::default()
        };
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: runc.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let r = Runtime::from_any(Some(&any)).unwrap();
        assert_eq!(r.binary_name, "/usr/sbin/runc");
        assert_eq!(r.io_uid, 1000);
        assert!(r.systemd_cgroup);

        // runtimeoptions.v1.Options{type_url: "x", config_path: "/etc/hyperbox/c.toml"}
        let mut v = vec![0x0a, 1, b'x', 0x12, 20];
        v.extend_from_slice(b"/etc/hyperbox/c.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: v,
            ..Default::default()
        };
        let r = Runtime::from_any(Some(&any)).unwrap();
        assert_eq!(r.config_path, Some(PathBuf::from("/etc/hyperbox/c.toml")));

        let any = Any {
            type_url: "example.com/Other".into(),
            ..Default::default()
        };
        let e = Runtime::from_any(Some(&any)).unwrap_err().to_string();
        assert!(e.contains("Other"), "{e}");
    }
}
