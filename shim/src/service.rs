//! The shim's process life: `start` (find or launch the shim serving this
//! container's group), `delete` (clean up after a shim that died), and
//! the long-running server's task service.

use std::path::Path;
use std::process::Stdio as ProcStdio;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{ExitSignal, Shim};
use containerd_shim::{Config, DeleteResponse, Flags, StartOpts, socket_address};
use tokio::io::AsyncReadExt;

use crate::options;
use crate::task::TaskService;

/// Annotation CRI puts on every container of a pod: the pod's sandbox id.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The shim, as containerd starts it.
pub struct HyperboxShim {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for HyperboxShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperboxShim")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .finish()
    }
}

#[async_trait]
impl Shim for HyperboxShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        HyperboxShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs `start` in the bundle directory.
        let grouping = group_of(Path::new("config.json")).unwrap_or_else(|| opts.id.clone());
        let mut stdin = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut stdin).await;
        let address = spawn(&opts, &grouping, &stdin).await?;
        tokio::fs::write("address", &address)
            .await
            .map_err(|e| containerd_shim::Error::Other(format!("write address: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // The shim serving this container died (kill -9): containerd asks
        // a fresh process, in the bundle directory, to clean up after it.
        let bundle = std::env::current_dir().unwrap_or_default();
        crate::task::cleanup_after_dead_shim(&self.namespace, &self.id, &bundle).await;
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: containerd_shim::protos::protobuf::MessageField::some(crate::task::now()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(&self.namespace, self.exit.clone(), publisher).await
    }
}

/// The group a container's shim serves: the pod's sandbox id for CRI
/// containers (one shim per pod, as runc-v2), else the container itself.
fn group_of(spec: &Path) -> Option<String> {
    let text = std::fs::read(spec).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.get("annotations")?
        .get(SANDBOX_ID)?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Starts the long-running shim for `grouping` unless one already serves
/// it, and returns its address.
async fn spawn(
    opts: &StartOpts,
    grouping: &str,
    options: &[u8],
) -> containerd_shim::Result<String> {
    let address = socket_address(&opts.address, &opts.namespace, grouping);
    let exe = std::env::current_exe()
        .map_err(|e| containerd_shim::Error::Other(format!("own executable: {e}")))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.current_dir(std::env::current_dir().unwrap_or_else(|_| "/".into()))
        .stdin(ProcStdio::null())
        .stdout(ProcStdio::piped())
        .stderr(ProcStdio::null())
        .args([
            "-namespace",
            &opts.namespace,
            "-id",
            &opts.id,
            "-address",
            &opts.address,
            "-socket",
            &address,
        ]);
    if opts.debug {
        cmd.arg("-debug");
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| containerd_shim::Error::Other(format!("spawn the shim server: {e}")))?;
    if let Some(pid) = child.id() {
        place(pid, options);
    }
    // The server closes its stdout once it listens (or found the group's
    // server already listening).
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out).await;
    }
    Ok(address)
}

/// Puts the shim server in the cgroup containerd's runtime options name
/// (`ShimCgroup`) and just above containerd in the OOM killer's order.
fn place(pid: u32, raw_options: &[u8]) {
    if let Ok(o) = options::Runtime::from_any_bytes(raw_options)
        && !o.shim_cgroup.is_empty()
        && let Err(e) = containerd_shim::cgroup::add_task_to_cgroup(&o.shim_cgroup, pid)
    {
        tracing::warn!(cgroup = %o.shim_cgroup, error = %e, "cannot move the shim into its cgroup");
    }
    if let Err(e) = containerd_shim::cgroup::adjust_oom_score(pid) {
        tracing::warn!(error = %e, "cannot set the shim's OOM score");
    }
}
