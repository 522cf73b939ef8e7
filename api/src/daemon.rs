//! What every hyperbox daemon does the same way at start: set up its logs
//! and bind its unix socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Errors of [`bind_unix`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process still answers on the socket.
    #[error("{} is in use by a running daemon", path.display())]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// A file operation on the socket or its directory failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// To which path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

/// Fails when a process still answers on the unix socket `path`.
pub fn ensure_free(path: &Path) -> Result<(), Error> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::InUse { path: path.into() });
    }
    Ok(())
}

/// Binds the unix socket `path` with `mode`: creates its directory, removes
/// a stale socket file a crash left behind, but refuses to steal the socket
/// of a daemon that still answers on it. Needs a tokio runtime.
pub fn bind_unix(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    if path.symlink_metadata().is_ok() {
        ensure_free(path)?;
        std::fs::remove_file(path).map_err(io("remove stale socket", path))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod", path))?;
    Ok(listener)
}

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` or else by
/// `default_filter` (`info`, `hyperbox_nri=debug`…), with colours only on a
/// terminal (journald and containerd's log files get plain text).
pub fn init_logging(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_but_a_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.sock");
        let live = bind_unix(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind_unix(&path, 0o600).unwrap_err();
        assert!(matches!(err, Error::InUse { .. }), "{err}");
        drop(live);
        // The file is still there, but nobody answers: a crash leftover.
        assert!(path.exists());
        let _again = bind_unix(&path, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
    }
}
