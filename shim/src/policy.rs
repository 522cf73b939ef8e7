//! hyperbox's policies at creation: before `runc create` the agent
//! decides the container's memory settings and the shim writes them into
//! the bundle's `config.json`; after create and after start the shim
//! registers the container so the agent traces it from its first
//! instruction; at delete it says the run ended.
//!
//! The agent being away, slow or refusing never blocks a container unless
//! `shim.fail_closed` says so: the call times out (`shim.agent_timeout_ms`),
//! the container starts with the spec it had, and the skip is logged and
//! appended to the skip journal the agent counts.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyperbox_api::annotations::SECCOMP_DECISION;
use hyperbox_api::client::Client;
use hyperbox_api::types::{ContainerInfo, DecidedBy, Policy, SeccompAction, SeccompDecision};
use serde_json::{Value, json};

/// CRI's annotations on a container's spec.
mod cri {
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
}

/// nerdctl's annotation with the container's name.
const NERDCTL_NAME: &str = "nerdctl/name";

/// The journal of skipped policies, one line each, beside the agent's
/// socket (`/run/hyperbox/shim-skipped.log` by default); the agent exports
/// the count as `hyperbox_shim_policy_skipped_total`.
pub const SKIP_JOURNAL: &str = "shim-skipped.log";

/// Why a policy could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bundle's spec could not be read or written.
    #[error("{path}: {reason}")]
    Spec { path: PathBuf, reason: String },
    /// The agent did not answer as it should and the config fails closed.
    #[error(
        "the hyperbox agent did not decide the container's policy ({0}) and shim.fail_closed is set"
    )]
    FailClosed(String),
}

/// The agent, as the shim reaches it.
#[derive(Debug, Clone)]
pub struct Agent {
    client: Client,
    policies: bool,
    fail_closed: bool,
    journal: PathBuf,
}

/// What the shim remembers of a container for the agent.
#[derive(Debug, Clone)]
pub struct Registration {
    info: ContainerInfo,
}

impl Agent {
    /// From the hyperbox config.
    pub fn new(cfg: &hyperbox_config::Config) -> Agent {
        Agent {
            client: Client::new(cfg.agent.address.clone())
                .with_timeout(Duration::from_millis(cfg.shim.agent_timeout_ms)),
            policies: cfg.shim.policies,
            fail_closed: cfg.shim.fail_closed,
            journal: cfg
                .agent
                .address
                .parent()
                .unwrap_or(Path::new("/run/hyperbox"))
                .join(SKIP_JOURNAL),
        }
    }

    /// Decides and writes the container's policy into `bundle/config.json`.
    /// `None`: nothing to tell the agent later (a pod's sandbox, or no
    /// agent on this node).
    pub async fn before_create(
        &self,
        bundle: &Path,
        namespace: &str,
        id: &str,
    ) -> Result<Option<Registration>, Error> {
        let path = bundle.join("config.json");
        let spec_err = |reason: String| Error::Spec {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read(&path).map_err(|e| spec_err(e.to_string()))?;
        let mut spec: Value = serde_json::from_slice(&text).map_err(|e| spec_err(e.to_string()))?;
        let Some(info) = info_of(&spec, namespace, id) else {
            return Ok(None);
        };
        let mut reg = Registration { info };
        if !self.policies {
            return Ok(Some(reg));
        }
        match self.client.policy(&reg.info).await {
            Ok(p) => {
                tracing::info!(container = id, decided_by = p.decided_by.as_str(), reason = %p.reason, "policy");
                let memory = p.decided_by == DecidedBy::Agent && apply(&mut spec, &p);
                if let Some(d) = &p.seccomp {
                    apply_seccomp(&mut spec, d);
                    let installed = d.action == SeccompAction::Install;
                    tracing::info!(container = id, mode = d.mode.as_str(), installed, reason = %d.reason, "seccomp");
                }
                let seccomp = p.seccomp.is_some();
                if memory || seccomp {
                    write_atomic(&path, &spec).map_err(|e| spec_err(e.to_string()))?;
                }
                if memory && let Some(l) = p.memory_limit {
                    reg.info.user_limit = Some(reg.info.limit);
                    reg.info.limit = Some(l);
                }
            }
            Err(e) => {
                let why = hyperbox_api::error_chain(&e);
                if self.fail_closed {
                    return Err(Error::FailClosed(why));
                }
                if !self.client.socket().exists() {
                    // No agent on this node at all: one line, and no
                    // registration to fail after create.
                    tracing::info!(container = id, socket = %self.client.socket().display(), "no hyperbox agent; the container runs with its own spec");
                    return Ok(None);
                }
                tracing::warn!(container = id, error = %why, "the agent did not decide; the container starts with its own spec");
                self.journal_skip(namespace, id, "policy", &why);
            }
        }
        Ok(Some(reg))
    }

    /// Registers the container after `runc create` (`running: false`) or
    /// after `runc start` (`running: true`).
    pub async fn register(&self, reg: &mut Registration, namespace: &str, running: bool) {
        reg.info.running = running;
        if let Err(e) = self.client.register(&reg.info).await {
            let why = hyperbox_api::error_chain(&e);
            tracing::warn!(container = %reg.info.id, error = %why, "the agent did not take the container; it runs untraced");
            self.journal_skip(namespace, &reg.info.id, "register", &why);
        }
    }

    /// Says the container's run ended.
    pub async fn unregister(&self, id: &str) {
        if let Err(e) = self.client.unregister(id).await {
            tracing::debug!(container = id, error = %hyperbox_api::error_chain(&e), "unregister");
        }
    }

    fn journal_skip(&self, namespace: &str, id: &str, what: &str, why: &str) {
        let line = format!(
            "{} {namespace}/{id} {what}: {}\n",
            hyperbox_api::time::unix_now(),
            why.replace('\n', " ")
        );
        // No directory: no agent was ever set up on this node.
        if !self.journal.parent().is_some_and(Path::exists) {
            return;
        }
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = r {
            tracing::warn!(journal = %self.journal.display(), error = %e, "cannot journal the skipped policy");
        }
    }
}

fn annotation<'a>(spec: &'a Value, key: &str) -> Option<&'a str> {
    spec.get("annotations")?.get(key)?.as_str()
}

/// What the agent needs to know, from the spec alone.
fn info_of(spec: &Value, namespace: &str, id: &str) -> Option<ContainerInfo> {
    if annotation(spec, cri::CONTAINER_TYPE) == Some("sandbox") {
        return None;
    }
    let annotations: HashMap<String, String> = spec
        .get("annotations")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let cri_ns = annotation(spec, cri::SANDBOX_NAMESPACE).filter(|s| !s.is_empty());
    let memory = spec.pointer("/linux/resources/memory");
    let positive = |v: Option<&Value>| {
        v.and_then(Value::as_i64)
            .filter(|v| *v > 0)
            .map(|v| v as u64)
    };
    Some(ContainerInfo {
        id: id.to_string(),
        name: annotation(spec, cri::CONTAINER_NAME)
            .or_else(|| annotation(spec, NERDCTL_NAME))
            .unwrap_or(id)
            .to_string(),
        pod_namespace: cri_ns.unwrap_or(namespace).to_string(),
        pod: annotation(spec, cri::SANDBOX_NAME)
            .unwrap_or_default()
            .to_string(),
        image: annotation(spec, cri::IMAGE_NAME)
            .unwrap_or_default()
            .to_string(),
        cgroups_path: spec
            .pointer("/linux/cgroupsPath")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        limit: positive(memory.and_then(|m| m.get("limit"))),
        had_swap: positive(memory.and_then(|m| m.get("swap"))).is_some(),
        cri: cri_ns.is_some(),
        annotations,
        seccomp: spec
            .pointer("/linux/seccomp")
            .filter(|v| !v.is_null())
            .cloned(),
        ..Default::default()
    })
}

/// Writes the agent's seccomp decision into the spec: the profile, when
/// it installs one (otherwise the runtime's stays as it was), and the
/// decision as an annotation either way.
fn apply_seccomp(spec: &mut Value, d: &SeccompDecision) {
    let root = spec.as_object_mut().expect("an OCI spec is an object");
    let annotations = root.entry("annotations").or_insert_with(|| json!({}));
    if let Some(a) = annotations.as_object_mut() {
        a.insert(SECCOMP_DECISION.into(), json!(d.annotation()));
    }
    if let (SeccompAction::Install, Some(profile)) = (d.action, &d.profile) {
        let linux = root.entry("linux").or_insert_with(|| json!({}));
        if let Some(l) = linux.as_object_mut() {
            l.insert("seccomp".into(), profile.clone());
        }
    }
}

/// Writes the agent's decision into the spec; `false` when it changes
/// nothing.
fn apply(spec: &mut Value, p: &Policy) -> bool {
    if p.memory_limit.is_none() && p.memory_high.is_none() && p.annotations.is_empty() {
        return false;
    }
    let root = spec.as_object_mut().expect("an OCI spec is an object");
    let linux = root.entry("linux").or_insert_with(|| json!({}));
    let resources = linux
        .as_object_mut()
        .map(|l| l.entry("resources").or_insert_with(|| json!({})));
    if let Some(resources) = resources.and_then(Value::as_object_mut) {
        if p.memory_limit.is_some() || p.memory_swap.is_some() {
            let memory = resources.entry("memory").or_insert_with(|| json!({}));
            if let Some(m) = memory.as_object_mut() {
                if let Some(l) = p.memory_limit {
                    m.insert("limit".into(), json!(l));
                }
                if let Some(s) = p.memory_swap {
                    m.insert("swap".into(), json!(s));
                }
            }
        }
        if let Some(h) = p.memory_high {
            let unified = resources.entry("unified").or_insert_with(|| json!({}));
            if let Some(u) = unified.as_object_mut() {
                u.insert("memory.high".into(), json!(h.to_string()));
            }
        }
    }
    let annotations = root.entry("annotations").or_insert_with(|| json!({}));
    if let Some(a) = annotations.as_object_mut() {
        for (k, v) in &p.annotations {
            a.insert(k.clone(), json!(v));
        }
    }
    true
}

fn write_atomic(path: &Path, spec: &Value) -> std::io::Result<()> {
    let tmp = path.with_extension("json.hyperbox");
    let bytes = serde_json::to_vec(spec).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn spec() -> Value {
        json!({
            "ociVersion": "1.1.0",
            "process": {"args": ["sh"]},
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.container-name": "web",
                "io.kubernetes.cri.sandbox-namespace": "shop",
                "io.kubernetes.cri.sandbox-name": "web-0",
                "io.kubernetes.cri.image-name": "reg/web:1"
            },
            "linux": {"cgroupsPath": "/k8s/web", "resources": {"memory": {"limit": 104857600, "swap": 104857600}}},
            "x-unknown": {"kept": true}
        })
    }

    #[test]
    fn a_cri_container_is_described_as_nri_would() {
        let i = info_of(&spec(), "k8s.io", "c1").unwrap();
        assert_eq!(
            (i.name.as_str(), i.pod_namespace.as_str(), i.pod.as_str()),
            ("web", "shop", "web-0")
        );
        assert_eq!(i.image, "reg/web:1");
        assert!(i.cri);
        assert_eq!(i.limit, Some(104857600));
        assert!(i.had_swap);
        let mut sandbox = spec();
        sandbox["annotations"]["io.kubernetes.cri.container-type"] = json!("sandbox");
        assert!(info_of(&sandbox, "k8s.io", "p1").is_none());
        // ctr: no CRI annotations, the containerd namespace.
        let plain = json!({"linux": {"cgroupsPath": "/default/c2"}});
        let i = info_of(&plain, "default", "c2").unwrap();
        assert_eq!(
            (i.name.as_str(), i.pod_namespace.as_str(), i.cri),
            ("c2", "default", false)
        );
        assert_eq!(i.limit, None);
    }

    #[test]
    fn the_decision_lands_in_the_spec_and_nothing_else_changes() {
        let mut s = spec();
        let p = Policy {
            memory_limit: Some(50 << 20),
            memory_high: Some(45 << 20),
            memory_swap: Some(50 << 20),
            annotations: BTreeMap::from([("memory.hyperbox.dev/decision".into(), "sized".into())]),
            decided_by: DecidedBy::Agent,
            reason: "sized".into(),
            seccomp: None,
        };
        assert!(apply(&mut s, &p));
        assert_eq!(
            s["linux"]["resources"]["memory"]["limit"],
            json!(50u64 << 20)
        );
        assert_eq!(
            s["linux"]["resources"]["memory"]["swap"],
            json!(50u64 << 20)
        );
        assert_eq!(
            s["linux"]["resources"]["unified"]["memory.high"],
            json!((45u64 << 20).to_string())
        );
        assert_eq!(
            s["annotations"]["memory.hyperbox.dev/decision"],
            json!("sized")
        );
        assert_eq!(s["x-unknown"], json!({"kept": true}));
        assert_eq!(s["process"], json!({"args": ["sh"]}));
        let none = Policy::unchanged(DecidedBy::Agent, "");
        let before = spec();
        let mut s = spec();
        assert!(!apply(&mut s, &none));
        assert_eq!(s, before);
    }

    #[test]
    fn an_installed_profile_replaces_the_runtimes_and_a_kept_one_stays() {
        let profile = json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []});
        let mut d = SeccompDecision {
            configured: hyperbox_config::SeccompMode::Auto,
            mode: hyperbox_config::SeccompMode::Enforce,
            action: SeccompAction::Install,
            profile: Some(profile.clone()),
            workload: "w".into(),
            allowed: 0,
            reason: "stable".into(),
        };
        let mut s = spec();
        s["linux"]["seccomp"] =
            json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"]}]});
        apply_seccomp(&mut s, &d);
        assert_eq!(s["linux"]["seccomp"], profile);
        assert_eq!(
            s["annotations"]["seccomp.hyperbox.dev/decision"],
            json!("enforce: stable")
        );
        let runtimes = json!({"defaultAction": "SCMP_ACT_ERRNO"});
        let mut s = spec();
        s["linux"]["seccomp"] = runtimes.clone();
        d.action = SeccompAction::Keep;
        d.profile = None;
        apply_seccomp(&mut s, &d);
        assert_eq!(
            s["linux"]["seccomp"], runtimes,
            "kept as the runtime set it"
        );
    }
}
