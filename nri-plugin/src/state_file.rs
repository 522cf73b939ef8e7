//! The agent's JSON state files (`workloads.json`, `seccomp.json`):
//! written atomically (temp file, fsync, rename, fsync of the directory)
//! so a crash never leaves a torn file, and a corrupt one is moved aside
//! (named in the log) instead of blocking the agent.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Errors of saving.
#[derive(Debug, thiserror::Error)]
#[error("save {path}")]
pub struct SaveError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Reads `path`: `None` when it does not exist, or when it was corrupt and
/// has been moved aside to `<path>.corrupt-<unix time>` (logged, with
/// `what` learning "starts over").
pub fn load<T: DeserializeOwned>(path: &Path, what: &str) -> std::io::Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match serde_json::from_slice::<T>(&bytes) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(".corrupt-{}", hyperbox_api::time::unix_now()));
            let aside = PathBuf::from(aside);
            std::fs::rename(path, &aside)?;
            tracing::error!(file = %path.display(), moved_to = %aside.display(), error = %e,
                "{what} is corrupt; moved aside, learning starts over");
            Ok(None)
        }
    }
}

/// Writes `value` to `path` as pretty JSON, atomically and durably.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), SaveError> {
    let err = |source| SaveError {
        path: path.to_path_buf(),
        source,
    };
    let body = serde_json::to_vec_pretty(value).map_err(|e| err(e.into()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&body).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}
