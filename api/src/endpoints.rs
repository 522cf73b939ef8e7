//! The local API's calls by name: each [`Client`] method knows its path
//! and its [`crate::types`], so callers never spell either.

use crate::client::{Client, Error, Lines};
use crate::types::{
    ContainerInfo, EventLine, Explain, Health, Policy, Prewarm, PrewarmRequest, ProfileDetail,
    ProfileDiff, ProfileSummary, Psi, Registered, SetMode, Top, Trace,
};

type Result<T> = std::result::Result<T, Error>;

/// A path segment or query value with everything but unreserved
/// characters percent-encoded, so an id cannot reach another endpoint and
/// a workload key (`ns/pod@sha256:…`) travels as one value, byte for byte.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `path?k=v&…` with each value encoded.
fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", segment(v)))
        .collect();
    format!("{path}?{}", q.join("&"))
}

impl Client {
    /// `POST /v1/prewarm` on the snapshotter's control socket
    /// ([`Client::snapshotter`]): fetches the learned prefetch lists of an
    /// image's lazy layers ahead of its next pull.
    pub async fn prewarm(&self, request: &PrewarmRequest) -> Result<Prewarm> {
        self.post("/v1/prewarm", request).await
    }

    /// `GET /v1/profiles`: every learned seccomp profile.
    pub async fn profiles(&self) -> Result<Vec<ProfileSummary>> {
        self.get("/v1/profiles").await
    }

    /// `GET /v1/profiles?workload=…&format=…`: one workload's profile, in
    /// `format` (`oci`, `localhost`, `spo`).
    pub async fn profile(&self, workload: &str, format: &str) -> Result<ProfileDetail> {
        self.get(&with_query(
            "/v1/profiles",
            &[("workload", workload), ("format", format)],
        ))
        .await
    }

    /// `GET /v1/profiles/diff?a=…&b=…` (`default`: the runtime's default
    /// profile).
    pub async fn profile_diff(&self, a: &str, b: &str) -> Result<ProfileDiff> {
        self.get(&with_query("/v1/profiles/diff", &[("a", a), ("b", b)]))
            .await
    }

    /// `PUT /v1/profiles`: a workload's mode override (`None` clears it).
    pub async fn set_profile_mode(&self, m: &SetMode) -> Result<()> {
        self.put("/v1/profiles", m).await
    }

    /// `DELETE /v1/profiles?workload=…`: forgets a workload's profile.
    pub async fn forget_profile(&self, workload: &str) -> Result<()> {
        self.delete(&with_query("/v1/profiles", &[("workload", workload)]))
            .await
    }

    /// `GET /healthz`.
    pub async fn health(&self) -> Result<Health> {
        self.get("/healthz").await
    }

    /// `GET /v1/psi`: node and container pressure.
    pub async fn psi(&self) -> Result<Psi> {
        self.get("/v1/psi").await
    }

    /// `GET /v1/containers`: the tracked containers.
    pub async fn containers(&self) -> Result<Vec<crate::types::Container>> {
        self.get("/v1/containers").await
    }

    /// `POST /v1/policies`: the memory settings of a container about to be
    /// created (the shim, before `runc create`). The agent tracks it from
    /// then on, unless [`Policy::decided_by`] says NRI did already or its
    /// policy is off.
    pub async fn policy(&self, info: &ContainerInfo) -> Result<Policy> {
        self.post("/v1/policies", info).await
    }

    /// `POST /v1/containers`: registers a container (the shim, after
    /// `runc create` with `running: false` and after `runc start` with
    /// `running: true`). A container the agent tracks already (through
    /// [`Client::policy`] or NRI) is not sized again: tracing starts if it
    /// has not, and `running` marks it started.
    pub async fn register(&self, info: &ContainerInfo) -> Result<Registered> {
        self.post("/v1/containers", info).await
    }

    /// `DELETE /v1/containers/{id}`: its run ended.
    pub async fn unregister(&self, id: &str) -> Result<()> {
        self.delete(&format!("/v1/containers/{}", segment(id)))
            .await
    }

    /// `GET /v1/containers/{query}`: a container (id, id prefix or name),
    /// what was learned and what was decided.
    pub async fn explain(&self, query: &str) -> Result<Explain> {
        self.get(&format!("/v1/containers/{}", segment(query)))
            .await
    }

    /// `GET /v1/containers/{query}/trace`: what the tracer saw of a
    /// container (id or id prefix).
    pub async fn trace(&self, query: &str) -> Result<Trace> {
        self.get(&format!("/v1/containers/{}/trace", segment(query)))
            .await
    }

    /// `GET /v1/containers/{query}/events`: the container's events as they
    /// happen.
    pub async fn events(&self, query: &str) -> Result<Events> {
        let lines = self
            .lines(&format!("/v1/containers/{}/events", segment(query)))
            .await?;
        Ok(Events(lines))
    }

    /// `GET /v1/top`: every traced container's counters now.
    pub async fn top(&self) -> Result<Top> {
        self.get("/v1/top").await
    }
}

/// The stream of [`Client::events`].
#[derive(Debug)]
pub struct Events(Lines);

impl Events {
    /// The next line; `None` when the agent ends the stream.
    pub async fn next(&mut self) -> Result<Option<EventLine>> {
        self.0.next().await
    }
}

#[cfg(test)]
mod tests {
    use super::{segment, with_query};

    #[test]
    fn ids_cannot_escape_their_path_segment() {
        assert_eq!(segment("abc-1.2_x"), "abc-1.2_x");
        assert_eq!(segment("../healthz?x"), "..%2Fhealthz%3Fx");
        assert_eq!(segment("a b"), "a%20b");
        // A workload key is one query value, however it is spelt.
        assert_eq!(
            with_query("/v1/profiles", &[("workload", "default/web@sha256:ab&x=1")]),
            "/v1/profiles?workload=default%2Fweb%40sha256%3Aab%26x%3D1"
        );
    }
}
