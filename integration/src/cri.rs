//! A CRI client that drives pods and containers the way the kubelet does:
//! PullImage, RunPodSandbox, CreateContainer, StartContainer, ExecSync,
//! container logs from the CRI log file, StopContainer/RemoveContainer and
//! StopPodSandbox/RemovePodSandbox.
//!
//! Pods run with the host network or in their own network namespace set up
//! by the CNI loopback plugin (Debian's containernetworking-plugins), which
//! needs no address outside the machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

use crate::client::Error;
use crate::containerd::Containerd;
use crate::footprint::Footprint;

type Result<T> = std::result::Result<T, Error>;

fn rpc(call: &'static str, what: impl Into<String>) -> impl FnOnce(tonic::Status) -> Error {
    let what = what.into();
    move |s| Error::Rpc {
        call,
        what,
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// How a pod is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetwork {
    /// `hostNetwork: true`.
    Host,
    /// Its own network namespace, set up through CNI (loopback only).
    Cni,
}

/// A running pod sandbox.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Sandbox id.
    pub id: String,
    /// The config it was created with (CreateContainer needs it again).
    pub config: PodSandboxConfig,
    /// Where container logs go.
    pub log_dir: PathBuf,
}

/// A CRI client for one containerd instance.
#[derive(Debug, Clone)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    footprint: Footprint,
}

/// What a container in a pod runs.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// Container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Command (entrypoint override); image default when empty.
    pub command: Vec<String>,
    /// Args (cmd override).
    pub args: Vec<String>,
    /// Annotations.
    pub annotations: HashMap<String, String>,
    /// Memory limit in bytes (0: none).
    pub memory_limit: i64,
    /// Read-only bind mounts: host path, path in the container.
    pub mounts: Vec<(std::path::PathBuf, String)>,
}

impl ContainerSpec {
    /// A container `name` from `image` running `command`.
    pub fn new(name: &str, image: &str, command: &[&str]) -> Self {
        ContainerSpec {
            name: name.into(),
            image: image.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }
}

impl Cri {
    /// Connects to the CRI service on `ctd`'s socket.
    pub async fn connect(ctd: &Containerd) -> Result<Self> {
        let channel = containerd_client::connect(ctd.address())
            .await
            .map_err(|source| Error::Connect {
                path: ctd.address().into(),
                source,
            })?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            footprint: ctd.footprint(),
        })
    }

    /// Succeeds once the runtime reports RuntimeReady (as the kubelet checks).
    pub async fn ready(&self) -> Result<()> {
        let st = self
            .runtime
            .clone()
            .status(StatusRequest { verbose: false })
            .await
            .map_err(rpc("Status", ""))?
            .into_inner();
        let ready = st
            .status
            .map(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == "RuntimeReady" && c.status)
            })
            .unwrap_or(false);
        if ready {
            Ok(())
        } else {
            Err(Error::State {
                subject: "CRI runtime".into(),
                detail: "RuntimeReady is false".into(),
            })
        }
    }

    /// CRI's version answer (`runtime_name runtime_version`).
    pub async fn version(&self) -> Result<String> {
        let v = self
            .runtime
            .clone()
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(rpc("Version", ""))?
            .into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// Pulls `image`; returns the image id (config digest).
    pub async fn pull_image(&self, image: &str) -> Result<String> {
        Ok(self
            .images
            .clone()
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: None,
            })
            .await
            .map_err(rpc("PullImage", image))?
            .into_inner()
            .image_ref)
    }

    /// True when CRI knows `image`.
    pub async fn image_present(&self, image: &str) -> Result<bool> {
        Ok(self
            .images
            .clone()
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .map_err(rpc("ImageStatus", image))?
            .into_inner()
            .image
            .is_some())
    }

    /// RemoveImage: every name CRI recorded for `image` (tag, digest, id),
    /// as `crictl rmi` does. Absent images are not an error.
    pub async fn remove_image(&self, image: &str) -> Result<()> {
        self.images
            .clone()
            .remove_image(RemoveImageRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(rpc("RemoveImage", image))?;
        Ok(())
    }

    /// Runs a pod sandbox named `name` with the default runtime handler.
    pub async fn run_pod(&self, name: &str, network: PodNetwork) -> Result<Pod> {
        self.run_pod_on(name, network, "").await
    }

    /// Runs a pod sandbox named `name` with runtime handler `handler`
    /// (`runtime_handler` of RunPodSandbox, as a RuntimeClass sets it).
    pub async fn run_pod_on(&self, name: &str, network: PodNetwork, handler: &str) -> Result<Pod> {
        let log_dir = self.footprint.dir.join("pods").join(name);
        std::fs::create_dir_all(&log_dir).map_err(|source| Error::Io {
            action: format!("create {}", log_dir.display()),
            source,
        })?;
        let mode = match network {
            PodNetwork::Host => NamespaceMode::Node,
            PodNetwork::Cni => NamespaceMode::Pod,
        } as i32;
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("{:016x}", rand::random::<u64>()),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: if network == PodNetwork::Host {
                String::new()
            } else {
                name.into()
            },
            log_directory: log_dir.to_string_lossy().into_owned(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("{}/pod-{name}", self.footprint.cgroup_prefix),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: mode,
                        pid: NamespaceMode::Pod as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .runtime
            .clone()
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await
            .map_err(rpc("RunPodSandbox", name))?
            .into_inner()
            .pod_sandbox_id;
        self.record_netns(&id).await;
        self.footprint.note_shim_sockets();
        Ok(Pod {
            id,
            config,
            log_dir,
        })
    }

    /// Remembers the pod's network namespace bind mount for teardown.
    async fn record_netns(&self, pod_id: &str) {
        let Ok(st) = self
            .runtime
            .clone()
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod_id.into(),
                verbose: true,
            })
            .await
        else {
            return;
        };
        let info = st.into_inner().info;
        let v = info
            .get("info")
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
            .unwrap_or_default();
        // containerd 1.7 exposes the netns in the sandbox's runtime spec.
        let path = v["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .map(PathBuf::from);
        let mut extra = self.footprint.extra.lock().unwrap();
        extra.sandboxes.push(pod_id.to_string());
        if let Some(p) = path.filter(|p| !p.as_os_str().is_empty()) {
            extra.netns.push(p);
        }
    }

    /// Creates a container in `pod`; returns its id.
    pub async fn create_container(&self, pod: &Pod, spec: &ContainerSpec) -> Result<String> {
        let host_net = pod
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .is_some_and(|n| n.network == NamespaceMode::Node as i32);
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: spec.name.clone(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: spec.image.clone(),
                ..Default::default()
            }),
            command: spec.command.clone(),
            args: spec.args.clone(),
            log_path: format!("{}.log", spec.name),
            annotations: spec.annotations.clone(),
            mounts: spec
                .mounts
                .iter()
                .map(|(host, path)| Mount {
                    container_path: path.clone(),
                    host_path: host.display().to_string(),
                    readonly: true,
                    ..Default::default()
                })
                .collect(),
            linux: Some(LinuxContainerConfig {
                resources: (spec.memory_limit > 0).then(|| LinuxContainerResources {
                    memory_limit_in_bytes: spec.memory_limit,
                    ..Default::default()
                }),
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: if host_net {
                            NamespaceMode::Node as i32
                        } else {
                            NamespaceMode::Pod as i32
                        },
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        Ok(self
            .runtime
            .clone()
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            })
            .await
            .map_err(rpc("CreateContainer", &spec.name))?
            .into_inner()
            .container_id)
    }

    /// Starts a created container.
    pub async fn start_container(&self, id: &str) -> Result<()> {
        self.runtime
            .clone()
            .start_container(StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map_err(rpc("StartContainer", id))?;
        Ok(())
    }

    /// Sets a running container's memory limit, as the kubelet resizes a
    /// container in place (UpdateContainerResources).
    pub async fn update_memory_limit(&self, id: &str, limit: i64) -> Result<()> {
        self.runtime
            .clone()
            .update_container_resources(UpdateContainerResourcesRequest {
                container_id: id.into(),
                linux: Some(LinuxContainerResources {
                    memory_limit_in_bytes: limit,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(rpc("UpdateContainerResources", id))?;
        Ok(())
    }

    /// Runs `cmd` in a running container and waits (kubelet probes, `kubectl exec`).
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<crate::client::Output> {
        let r = self
            .runtime
            .clone()
            .exec_sync(ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout.as_secs() as i64,
            })
            .await
            .map_err(rpc("ExecSync", id))?
            .into_inner();
        Ok(crate::client::Output {
            status: r.exit_code as u32,
            stdout: r.stdout,
            stderr: r.stderr,
        })
    }

    /// The container's status.
    pub async fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        self.runtime
            .clone()
            .container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .map_err(rpc("ContainerStatus", id))?
            .into_inner()
            .status
            .ok_or_else(|| Error::State {
                subject: id.into(),
                detail: "ContainerStatus returned no status".into(),
            })
    }

    /// Polls ContainerStatus until the container has exited (as the kubelet's
    /// PLEG does); returns its exit code.
    pub async fn wait_exited(&self, id: &str, timeout: Duration) -> Result<i32> {
        let start = Instant::now();
        loop {
            let st = self.container_status(id).await?;
            if st.state == ContainerState::ContainerExited as i32 {
                return Ok(st.exit_code);
            }
            if start.elapsed() > timeout {
                return Err(Error::State {
                    subject: id.into(),
                    detail: format!("still not exited after {timeout:?} (state {})", st.state),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The container's log as the kubelet shows it: the content of each CRI
    /// log line (`<time> <stream> <P|F> <text>`), partial lines joined.
    pub async fn logs(&self, pod: &Pod, name: &str) -> Result<String> {
        let path = pod.log_dir.join(format!("{name}.log"));
        let raw = tokio::fs::read_to_string(&path)
            .await
            .map_err(|source| Error::Io {
                action: format!("read {}", path.display()),
                source,
            })?;
        Ok(parse_cri_log(&raw))
    }

    /// StopContainer with a grace period, then RemoveContainer.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let mut rt = self.runtime.clone();
        rt.stop_container(StopContainerRequest {
            container_id: id.into(),
            timeout: 2,
        })
        .await
        .map_err(rpc("StopContainer", id))?;
        rt.remove_container(RemoveContainerRequest {
            container_id: id.into(),
        })
        .await
        .map_err(rpc("RemoveContainer", id))?;
        Ok(())
    }

    /// StopPodSandbox then RemovePodSandbox.
    pub async fn remove_pod(&self, pod: &Pod) -> Result<()> {
        let mut rt = self.runtime.clone();
        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .map_err(rpc("StopPodSandbox", &pod.id))?;
        rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .map_err(rpc("RemovePodSandbox", &pod.id))?;
        Ok(())
    }
}

/// Joins the text of CRI log lines; `P` lines are continued by the next line.
pub fn parse_cri_log(raw: &str) -> String {
    let mut out = String::new();
    for line in raw.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_time, _stream, tag) = (parts.next(), parts.next(), parts.next());
        let text = parts.next().unwrap_or("");
        out.push_str(text);
        if tag != Some("P") {
            out.push('\n');
        }
    }
    out
}

/// The pause image a CRI sandbox runs: busybox whose init waits for a signal
/// and exits 0 on SIGTERM/SIGINT, as the real pause does.
pub fn pause_image_spec() -> std::io::Result<crate::image::ImageSpec> {
    crate::image::ImageSpec::busybox(&[
        "/bin/sh",
        "-c",
        "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_are_joined_and_partials_continue() {
        let raw = "2024-01-01T00:00:00.1Z stdout F hello\n2024-01-01T00:00:00.2Z stderr P par\n2024-01-01T00:00:00.3Z stderr F tial\n";
        assert_eq!(parse_cri_log(raw), "hello\npartial\n");
    }
}
