//! NRI's protobuf messages (package `nri.pkg.api.v1alpha1`), the subset the
//! agent reads or writes, with the field numbers of NRI's API definition.
//!
//! Written as prost structs rather than generated: the API has about sixty
//! messages and we touch twenty, and prost skips the fields we leave out, so
//! one set of structs decodes what containerd 1.7 (NRI v0.6.1) and
//! containerd 2.x (NRI v0.12.3 in 2.4) send. Fields added after v0.6.1
//! (`more`, the timeouts, the version strings, the container's image) are
//! zero or absent when an older runtime sends nothing; the package name and
//! every field number we use are the same in both.

use std::collections::HashMap;

/// The runtime's ttrpc service (conn 2).
pub const RUNTIME_SERVICE: &str = "nri.pkg.api.v1alpha1.Runtime";
/// The plugin's ttrpc service (conn 1).
pub const PLUGIN_SERVICE: &str = "nri.pkg.api.v1alpha1.Plugin";
/// The NRI release whose API definition these messages follow, sent in
/// `RegisterPlugin`. Runtimes only log it (v0.12.3 prints it when the
/// plugin registers; v0.6.1 does not know the field).
pub const NRI_VERSION: &str = "v0.12.3";

/// `RegisterPluginRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RegisterPluginRequest {
    /// The plugin's name.
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    /// Its two-digit index.
    #[prost(string, tag = "2")]
    pub plugin_idx: String,
    /// The NRI version the plugin speaks ([`NRI_VERSION`]; newer runtimes
    /// log it).
    #[prost(string, tag = "3")]
    pub nri_version: String,
}

/// `Empty`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

/// `UpdateContainersRequest`: unsolicited updates from the plugin.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateContainersRequest {
    /// The updates.
    #[prost(message, repeated, tag = "1")]
    pub update: Vec<ContainerUpdate>,
    /// Containers to evict.
    #[prost(message, repeated, tag = "2")]
    pub evict: Vec<ContainerEviction>,
}

/// `UpdateContainersResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateContainersResponse {
    /// The updates the runtime could not apply.
    #[prost(message, repeated, tag = "1")]
    pub failed: Vec<ContainerUpdate>,
}

/// `ConfigureRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfigureRequest {
    /// The plugin's config (pre-registered plugins: the conf.d file).
    #[prost(string, tag = "1")]
    pub config: String,
    /// e.g. `containerd`.
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    /// e.g. `1.7.24`.
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    /// Registration timeout in ms (newer runtimes).
    #[prost(int64, tag = "4")]
    pub registration_timeout: i64,
    /// Request timeout in ms (newer runtimes).
    #[prost(int64, tag = "5")]
    pub request_timeout: i64,
    /// The NRI module version the runtime was built with, e.g. `v0.12.3`
    /// (after v0.6.1; empty from containerd 1.7).
    #[prost(string, tag = "6")]
    pub nri_version: String,
}

/// `ConfigureResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfigureResponse {
    /// The event mask: bit `1 << (event - 1)` per [`Event`]. Zero means
    /// every event the runtime knows, which on NRI v0.12 includes
    /// [`Event::ValidateContainerAdjustment`] and so makes the plugin a
    /// validator every creation waits for: always send an explicit mask.
    #[prost(int32, tag = "2")]
    pub events: i32,
}

/// `SynchronizeRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SynchronizeRequest {
    /// Existing pods.
    #[prost(message, repeated, tag = "1")]
    pub pods: Vec<PodSandbox>,
    /// Existing containers.
    #[prost(message, repeated, tag = "2")]
    pub containers: Vec<Container>,
    /// More batches follow: NRI v0.12 splits a state too large for one
    /// ttrpc message, and closes a plugin that answers a batch with
    /// updates or with a `more` different from the request's.
    #[prost(bool, tag = "3")]
    pub more: bool,
}

/// `SynchronizeResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SynchronizeResponse {
    /// Updates to existing containers.
    #[prost(message, repeated, tag = "1")]
    pub update: Vec<ContainerUpdate>,
    /// The plugin expects more batches.
    #[prost(bool, tag = "2")]
    pub more: bool,
}

/// The request of every per-container event: `CreateContainerRequest`,
/// `StartContainerRequest`, `StopContainerRequest`, `RemoveContainerRequest`,
/// the `Post*` ones and (with field 3) `UpdateContainerRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerRequest {
    /// The container's pod.
    #[prost(message, optional, tag = "1")]
    pub pod: Option<PodSandbox>,
    /// The container.
    #[prost(message, optional, tag = "2")]
    pub container: Option<Container>,
    /// UpdateContainer only: the resources being set.
    #[prost(message, optional, tag = "3")]
    pub linux_resources: Option<LinuxResources>,
}

/// `CreateContainerResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerResponse {
    /// Changes to the container being created.
    #[prost(message, optional, tag = "1")]
    pub adjust: Option<ContainerAdjustment>,
    /// Updates to other containers.
    #[prost(message, repeated, tag = "2")]
    pub update: Vec<ContainerUpdate>,
    /// Containers to evict.
    #[prost(message, repeated, tag = "3")]
    pub evict: Vec<ContainerEviction>,
}

/// `UpdateContainerResponse` (also `StopContainerResponse`: field 1 only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateContainerResponse {
    /// Updates to containers.
    #[prost(message, repeated, tag = "1")]
    pub update: Vec<ContainerUpdate>,
    /// Containers to evict.
    #[prost(message, repeated, tag = "2")]
    pub evict: Vec<ContainerEviction>,
}

/// `StateChangeEvent`: how NRI v0.6.1 delivers the events without a
/// dedicated call (start, remove, pod events). NRI v0.12 calls a method per
/// event and falls back to this only for a plugin that answers the
/// dedicated method `UNIMPLEMENTED` (logging a deprecation warning).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StateChangeEvent {
    /// Which event.
    #[prost(enumeration = "Event", tag = "1")]
    pub event: i32,
    /// The pod.
    #[prost(message, optional, tag = "2")]
    pub pod: Option<PodSandbox>,
    /// The container, for container events.
    #[prost(message, optional, tag = "3")]
    pub container: Option<Container>,
}

/// NRI's events; the mask bit of event `e` is `1 << (e - 1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Event {
    /// Not an event.
    Unknown = 0,
    /// RunPodSandbox.
    RunPodSandbox = 1,
    /// StopPodSandbox.
    StopPodSandbox = 2,
    /// RemovePodSandbox.
    RemovePodSandbox = 3,
    /// CreateContainer.
    CreateContainer = 4,
    /// PostCreateContainer.
    PostCreateContainer = 5,
    /// StartContainer.
    StartContainer = 6,
    /// PostStartContainer.
    PostStartContainer = 7,
    /// UpdateContainer.
    UpdateContainer = 8,
    /// PostUpdateContainer.
    PostUpdateContainer = 9,
    /// StopContainer.
    StopContainer = 10,
    /// RemoveContainer.
    RemoveContainer = 11,
    /// UpdatePodSandbox (after v0.6.1; in v0.12.3): a pod's resources
    /// change. containerd 1.7 refuses a mask with this bit or a later one
    /// (`invalid plugin events`) and drops the plugin.
    UpdatePodSandbox = 12,
    /// PostUpdatePodSandbox (after v0.6.1; in v0.12.3).
    PostUpdatePodSandbox = 13,
    /// ValidateContainerAdjustment (after v0.6.1; in v0.12.3): the plugin vets every
    /// creation's combined adjustment; creation fails if it rejects or
    /// errs.
    ValidateContainerAdjustment = 14,
}

impl Event {
    /// This event's bit in the Configure mask.
    pub fn mask(self) -> i32 {
        1 << (self as i32 - 1)
    }

    /// Whether NRI v0.6 (containerd 1.7) knows this event, i.e. whether a
    /// mask holding it is accepted there.
    pub fn known_to_v0_6(self) -> bool {
        (self as i32) <= Event::RemoveContainer as i32
    }
}

/// `PodSandbox`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandbox {
    /// Sandbox id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Pod name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Pod uid.
    #[prost(string, tag = "3")]
    pub uid: String,
    /// Pod namespace.
    #[prost(string, tag = "4")]
    pub namespace: String,
    /// Labels.
    #[prost(map = "string, string", tag = "5")]
    pub labels: HashMap<String, String>,
    /// Annotations.
    #[prost(map = "string, string", tag = "6")]
    pub annotations: HashMap<String, String>,
    /// The runtime handler (runtime class).
    #[prost(string, tag = "7")]
    pub runtime_handler: String,
    /// Linux details.
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandbox>,
}

/// `LinuxPodSandbox`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxPodSandbox {
    /// The pod's cgroup parent.
    #[prost(string, tag = "3")]
    pub cgroup_parent: String,
    /// The sandbox's own cgroup path.
    #[prost(string, tag = "4")]
    pub cgroups_path: String,
}

/// `Container`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Container {
    /// Container id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Its pod's sandbox id.
    #[prost(string, tag = "2")]
    pub pod_sandbox_id: String,
    /// Container name (within the pod).
    #[prost(string, tag = "3")]
    pub name: String,
    /// `ContainerState`: 1 created, 2 paused, 3 running, 4 stopped.
    #[prost(int32, tag = "4")]
    pub state: i32,
    /// Labels.
    #[prost(map = "string, string", tag = "5")]
    pub labels: HashMap<String, String>,
    /// Annotations (CRI adds `io.kubernetes.cri.image-name`).
    #[prost(map = "string, string", tag = "6")]
    pub annotations: HashMap<String, String>,
    /// Command line.
    #[prost(string, repeated, tag = "7")]
    pub args: Vec<String>,
    /// Linux details.
    #[prost(message, optional, tag = "11")]
    pub linux: Option<LinuxContainer>,
    /// The init pid, once it exists.
    #[prost(uint32, tag = "12")]
    pub pid: u32,
    /// The image (after v0.6.1; containerd 2.4 sends it, 1.7 does not,
    /// where only CRI's `io.kubernetes.cri.image-name` annotation names it).
    #[prost(message, optional, tag = "22")]
    pub image: Option<Image>,
}

/// `Image`: what a container runs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    /// The normalized reference, e.g. `docker.io/library/busybox:1.36`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The index or manifest digest.
    #[prost(string, tag = "2")]
    pub digest: String,
    /// The config digest.
    #[prost(string, tag = "3")]
    pub config_digest: String,
}

/// `ContainerState::CONTAINER_RUNNING`.
pub const CONTAINER_RUNNING: i32 = 3;
/// `ContainerState::CONTAINER_STOPPED`.
pub const CONTAINER_STOPPED: i32 = 4;

/// `LinuxContainer`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxContainer {
    /// Resources as the runtime will apply them.
    #[prost(message, optional, tag = "3")]
    pub resources: Option<LinuxResources>,
    /// The OCI `cgroupsPath` (`/a/b/c`, or `slice:prefix:name` with systemd).
    #[prost(string, tag = "5")]
    pub cgroups_path: String,
    /// How the user chose the seccomp profile (NRI 0.10+, containerd 2.2+;
    /// absent: no choice made, treated as Unconfined).
    #[prost(message, optional, tag = "7")]
    pub seccomp_profile: Option<SecurityProfile>,
    /// The spec's seccomp profile as generated (NRI 0.10+; absent: none).
    #[prost(message, optional, tag = "8")]
    pub seccomp_policy: Option<LinuxSeccomp>,
}

/// `SecurityProfile`: a CRI security profile choice.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SecurityProfile {
    /// [`PROFILE_RUNTIME_DEFAULT`], [`PROFILE_UNCONFINED`] or
    /// [`PROFILE_LOCALHOST`].
    #[prost(int32, tag = "1")]
    pub profile_type: i32,
    /// The Localhost profile's path.
    #[prost(string, tag = "2")]
    pub localhost_ref: String,
}

/// `SecurityProfile.ProfileType` RUNTIME_DEFAULT.
pub const PROFILE_RUNTIME_DEFAULT: i32 = 0;
/// `SecurityProfile.ProfileType` UNCONFINED.
pub const PROFILE_UNCONFINED: i32 = 1;
/// `SecurityProfile.ProfileType` LOCALHOST.
pub const PROFILE_LOCALHOST: i32 = 2;

/// `LinuxSeccomp`: an OCI seccomp profile, its strings spelled as in OCI
/// (`SCMP_ACT_ALLOW`, `SCMP_ARCH_X86_64`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxSeccomp {
    /// `defaultAction`.
    #[prost(string, tag = "1")]
    pub default_action: String,
    /// `defaultErrnoRet` (containerd 2.4's NRI does not apply it: leave it
    /// out and let SCMP_ACT_ERRNO mean EPERM).
    #[prost(message, optional, tag = "2")]
    pub default_errno: Option<OptionalUInt32>,
    /// `architectures`.
    #[prost(string, repeated, tag = "3")]
    pub architectures: Vec<String>,
    /// `flags`.
    #[prost(string, repeated, tag = "4")]
    pub flags: Vec<String>,
    /// `listenerPath`.
    #[prost(string, tag = "5")]
    pub listener_path: String,
    /// `listenerMetadata`.
    #[prost(string, tag = "6")]
    pub listener_metadata: String,
    /// `syscalls`.
    #[prost(message, repeated, tag = "7")]
    pub syscalls: Vec<LinuxSyscall>,
}

/// `LinuxSyscall`: one rule.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxSyscall {
    /// `names`.
    #[prost(string, repeated, tag = "1")]
    pub names: Vec<String>,
    /// `action`.
    #[prost(string, tag = "2")]
    pub action: String,
    /// `errnoRet`.
    #[prost(message, optional, tag = "3")]
    pub errno_ret: Option<OptionalUInt32>,
    /// `args`.
    #[prost(message, repeated, tag = "4")]
    pub args: Vec<LinuxSeccompArg>,
}

/// `LinuxSeccompArg`: one argument condition.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxSeccompArg {
    /// `index`.
    #[prost(uint32, tag = "1")]
    pub index: u32,
    /// `value`.
    #[prost(uint64, tag = "2")]
    pub value: u64,
    /// `valueTwo`.
    #[prost(uint64, tag = "3")]
    pub value_two: u64,
    /// `op` (`SCMP_CMP_EQ`…).
    #[prost(string, tag = "4")]
    pub op: String,
}

/// `OptionalUInt32`: presence distinguishes "unset" from 0.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OptionalUInt32 {
    /// The value.
    #[prost(uint32, tag = "1")]
    pub value: u32,
}

/// `LinuxResources`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxResources {
    /// Memory settings.
    #[prost(message, optional, tag = "1")]
    pub memory: Option<LinuxMemory>,
    /// cgroup v2 files to set (`memory.high`, ...).
    #[prost(map = "string, string", tag = "6")]
    pub unified: HashMap<String, String>,
}

/// `LinuxMemory`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxMemory {
    /// The hard limit in bytes.
    #[prost(message, optional, tag = "1")]
    pub limit: Option<OptionalInt64>,
    /// The soft limit (request) in bytes.
    #[prost(message, optional, tag = "2")]
    pub reservation: Option<OptionalInt64>,
    /// memory+swap limit.
    #[prost(message, optional, tag = "3")]
    pub swap: Option<OptionalInt64>,
}

/// `OptionalInt64`: presence distinguishes "unset" from 0.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OptionalInt64 {
    /// The value.
    #[prost(int64, tag = "1")]
    pub value: i64,
}

/// `ContainerAdjustment`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerAdjustment {
    /// Annotations to add.
    #[prost(map = "string, string", tag = "2")]
    pub annotations: HashMap<String, String>,
    /// Linux changes.
    #[prost(message, optional, tag = "6")]
    pub linux: Option<LinuxContainerAdjustment>,
}

/// `LinuxContainerAdjustment`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxContainerAdjustment {
    /// Resources to set.
    #[prost(message, optional, tag = "2")]
    pub resources: Option<LinuxResources>,
    /// Replaces the spec's seccomp profile whole (NRI 0.10+, containerd
    /// 2.2+; older runtimes ignore the field).
    #[prost(message, optional, tag = "6")]
    pub seccomp_policy: Option<LinuxSeccomp>,
}

/// `ContainerUpdate`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerUpdate {
    /// Which container.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// The new resources.
    #[prost(message, optional, tag = "2")]
    pub linux: Option<LinuxContainerUpdate>,
    /// Do not fail the request when this update fails.
    #[prost(bool, tag = "3")]
    pub ignore_failure: bool,
}

/// `LinuxContainerUpdate`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxContainerUpdate {
    /// The resources.
    #[prost(message, optional, tag = "1")]
    pub resources: Option<LinuxResources>,
}

/// `ValidateContainerAdjustmentResponse`: the verdict of a validator (a
/// plugin subscribed to [`Event::ValidateContainerAdjustment`]).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValidateContainerAdjustmentResponse {
    /// Refuse the creation.
    #[prost(bool, tag = "1")]
    pub reject: bool,
    /// Why.
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// `ContainerEviction`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerEviction {
    /// Which container.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// Why.
    #[prost(string, tag = "2")]
    pub reason: String,
}

impl LinuxResources {
    /// Resources that set the memory limit to `limit` and, when given, the
    /// cgroup v2 `memory.high`.
    pub fn memory(limit: i64, high: Option<i64>) -> LinuxResources {
        let mut unified = HashMap::new();
        if let Some(h) = high {
            unified.insert("memory.high".to_string(), h.to_string());
        }
        LinuxResources {
            memory: Some(LinuxMemory {
                limit: Some(OptionalInt64 { value: limit }),
                reservation: None,
                swap: None,
            }),
            unified,
        }
    }

    /// The memory limit, when set (and positive).
    pub fn memory_limit(&self) -> Option<i64> {
        self.memory
            .as_ref()
            .and_then(|m| m.limit.as_ref())
            .map(|l| l.value)
            .filter(|v| *v > 0)
    }

    /// The memory request (soft limit), when set (and positive).
    pub fn memory_request(&self) -> Option<i64> {
        self.memory
            .as_ref()
            .and_then(|m| m.reservation.as_ref())
            .map(|l| l.value)
            .filter(|v| *v > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn event_mask_bits_follow_the_runtime() {
        assert_eq!(Event::RunPodSandbox.mask(), 1);
        assert_eq!(Event::CreateContainer.mask(), 8);
        assert_eq!(Event::RemoveContainer.mask(), 1 << 10);
    }

    #[test]
    fn configure_response_uses_field_two() {
        // Field 2, varint: key byte (2 << 3) | 0 = 0x10.
        let bytes = ConfigureResponse { events: 8 }.encode_to_vec();
        assert_eq!(bytes, vec![0x10, 0x08]);
    }

    #[test]
    fn unknown_fields_of_newer_runtimes_are_skipped() {
        // A Container with an id plus field 13 (rlimits, not modelled).
        let mut bytes = Container {
            id: "c1".into(),
            ..Default::default()
        }
        .encode_to_vec();
        bytes.extend_from_slice(&[0x6a, 0x02, 0x0a, 0x00]);
        let c = Container::decode(bytes.as_slice()).unwrap();
        assert_eq!(c.id, "c1");
    }

    #[test]
    fn the_image_field_of_newer_runtimes_is_read() {
        // Container field 22 (Image), name field 1: as containerd 2.4 sends.
        let mut bytes = Container {
            id: "c1".into(),
            ..Default::default()
        }
        .encode_to_vec();
        bytes.extend_from_slice(&[0xb2, 0x01, 0x05, 0x0a, 0x03]);
        bytes.extend_from_slice(b"app");
        let c = Container::decode(bytes.as_slice()).unwrap();
        assert_eq!(c.image.map(|i| i.name).as_deref(), Some("app"));
    }

    #[test]
    fn memory_resources_carry_limit_and_high() {
        let r = LinuxResources::memory(100, Some(90));
        assert_eq!(r.memory_limit(), Some(100));
        assert_eq!(r.unified.get("memory.high").map(String::as_str), Some("90"));
        let back = LinuxResources::decode(r.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, r);
    }
}
