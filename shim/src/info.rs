//! `containerd-shim-hyperbox-v1 -info`: what containerd 2.x asks every
//! runtime before it creates a task (introspection's `RuntimeInfo`), to
//! learn the OCI features of the runc behind it (recursive read-only
//! mounts, idmap, the annotations it accepts).

use std::io::Read;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

use crate::options::Runtime;

/// The `Any` type of runc's `features` JSON.
const FEATURES_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// Answers `-info`: reads the runtime options from stdin and writes the
/// serialized `RuntimeInfo` to stdout.
pub fn answer(runtime: &str) -> Result<Vec<u8>, String> {
    let mut raw = Vec::new();
    std::io::stdin()
        .read_to_end(&mut raw)
        .map_err(|e| format!("read the runtime options: {e}"))?;
    let opts = Runtime::from_any_bytes(&raw).map_err(|e| e.to_string())?;
    let runc = if opts.binary_name.is_empty() {
        let path = opts
            .config_path
            .clone()
            .or_else(|| std::env::var_os("HYPERBOX_CONFIG").map(Into::into));
        hyperbox_config::Config::load(path.as_deref())
            .map_err(|e| hyperbox_api::error_chain(&e))?
            .shim
            .runc
    } else {
        opts.binary_name.clone()
    };
    let out = std::process::Command::new(&runc)
        .arg("features")
        .output()
        .map_err(|e| format!("run {runc} features: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{runc} features: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let options = (!raw.is_empty())
        .then(|| Any::parse_from_bytes(&raw).ok())
        .flatten();
    let info = RuntimeInfo {
        name: runtime.to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        options: options.into(),
        features: MessageField::some(Any {
            type_url: FEATURES_TYPE.to_string(),
            value: out.stdout,
            ..Default::default()
        }),
        ..Default::default()
    };
    info.write_to_bytes().map_err(|e| e.to_string())
}
