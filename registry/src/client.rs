//! Talking to registries: endpoint selection from hosts.toml, auth, retries
//! with backoff, resumable verified downloads and a global download limit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_RANGE, HeaderMap, RANGE, WWW_AUTHENTICATE};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::auth::{Challenge, Credentials, DockerConfig, parse_challenges};
use crate::digest::{Digest, Verifier};
use crate::error::Error;
use crate::hosts::{self, Endpoint};
use crate::reference::Reference;

/// Manifests and indexes larger than this are refused (real ones are a few
/// KiB; containerd refuses manifests past 4 MiB too).
const MAX_MANIFEST: usize = 4 << 20;
/// How much of an error reply is read for its message; the rest is dropped
/// unread, so a registry that streams an endless error costs nothing.
const MAX_ERROR_BODY: usize = 4 << 10;
/// Token service replies larger than this are refused (real ones hold one
/// token of a few KiB).
const MAX_TOKEN_REPLY: usize = 1 << 20;
/// Redirects followed per request, as Go's HTTP client (containerd's) does.
const MAX_REDIRECTS: usize = 10;
/// Image configs larger than this are refused.
const MAX_CONFIG: usize = 8 << 20;
/// Backoff before the first retry; doubled per retry up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// What an interrupted download must have brought for its retries to
/// start counting again ([`Registry::download_across`]).
const RETRY_PROGRESS: u64 = 1 << 20;
/// How long a parsed hosts.toml is used before the file is read again;
/// edits take effect within this time, without a restart.
const HOSTS_TTL: Duration = Duration::from_secs(5);

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An OCI descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// Content digest.
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
    /// Annotations.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

/// An image resolved down to one platform's manifest and config.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The normalized reference.
    pub reference: Reference,
    /// What the reference points at (index or manifest).
    pub top: Descriptor,
    /// Its bytes.
    pub top_bytes: Vec<u8>,
    /// The platform's manifest (equals `top` for a bare manifest).
    pub manifest: Descriptor,
    /// Its bytes.
    pub manifest_bytes: Vec<u8>,
    /// The image config.
    pub config: Descriptor,
    /// Its bytes.
    pub config_bytes: Vec<u8>,
    /// Layers, bottom first.
    pub layers: Vec<Descriptor>,
    /// Uncompressed layer digests from the config, bottom first.
    pub diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    #[serde(flatten)]
    desc: Descriptor,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ImageConfig {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct TokenReply {
    token: Option<String>,
    access_token: Option<String>,
}

/// The OCI architecture name of this machine.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// How long a blob may be: a download never reads past it, and a reply
/// that announces or streams more is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobSize {
    /// The size the blob's descriptor gives (a manifest's layer entry).
    /// Bytes beyond it cannot be the blob's, whatever the transfer says.
    Exact(u64),
    /// At most this many bytes, when no descriptor is at hand.
    AtMost(u64),
}

impl BlobSize {
    fn limit(self) -> u64 {
        match self {
            BlobSize::Exact(n) | BlobSize::AtMost(n) => n,
        }
    }

    fn why(self) -> &'static str {
        match self {
            BlobSize::Exact(_) => "the size its manifest gives it",
            BlobSize::AtMost(_) => "the most a layer may hold (snapshotter.max_layer_bytes)",
        }
    }
}

/// Progress of one download: bytes so far, total if known.
pub type Progress<'a> = &'a (dyn Fn(u64, Option<u64>) + Send + Sync);

/// Awaited before each piece of a download's body is read, with the bytes
/// read so far: a download that must give way to other traffic (the lazy
/// path's background fill, to the reads a container waits for) stops
/// reading while it is pending, and TCP stops the sender once the socket's
/// buffer is full. The client's read timeout runs only while the body is
/// polled, so a pause does not trip it; a server that drops an idle
/// connection is resumed from where the download stopped. It resolves to
/// false once the download is no longer wanted (its lazy layer was
/// removed): the download ends with [`Error::Stopped`] and its partial
/// file is removed, instead of crossing the link for nobody.
pub type Pace = Arc<dyn Fn(u64) -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

/// A registry client for every host, configured like containerd.
pub struct Registry {
    config_path: PathBuf,
    docker_config: PathBuf,
    retries: u32,
    timeout: Duration,
    downloads: Arc<Semaphore>,
    clients: Mutex<HashMap<(Vec<PathBuf>, bool), reqwest::Client>>,
    /// `Authorization` values by endpoint base and repository.
    auth: Mutex<HashMap<(String, String), String>>,
    /// Parsed hosts.toml endpoints by host, with when they were read.
    hosts: Mutex<HashMap<String, (std::time::Instant, Vec<Endpoint>)>>,
    /// The endpoint base that last worked for a host: tried first next
    /// time, so a dead mirror or HTTPS on a plain-HTTP loopback registry
    /// costs one failure, not one per request.
    preferred: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the cached Authorization values: they are credentials.
        f.debug_struct("Registry")
            .field("config_path", &self.config_path)
            .field("docker_config", &self.docker_config)
            .field("retries", &self.retries)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A client with `[registry]` settings.
    pub fn new(cfg: &hyperbox_config::Registry) -> Result<Registry, Error> {
        Ok(Registry {
            config_path: cfg.config_path.clone(),
            docker_config: {
                // Read once here so a malformed file fails at start-up.
                DockerConfig::load(&cfg.docker_config)?;
                cfg.docker_config.clone()
            },
            retries: cfg.retries,
            timeout: Duration::from_secs(cfg.timeout_secs),
            downloads: Arc::new(Semaphore::new(cfg.max_concurrent_downloads as usize)),
            clients: Mutex::new(HashMap::new()),
            auth: Mutex::new(HashMap::new()),
            preferred: Mutex::new(HashMap::new()),
            hosts: Mutex::new(HashMap::new()),
        })
    }

    fn client(&self, ep: &Endpoint) -> Result<reqwest::Client, Error> {
        let key = (ep.ca.clone(), ep.skip_verify);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let mut b = reqwest::Client::builder()
            // Redirects are followed by `send_following`, which decides per
            // hop which headers may go there.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(self.timeout)
            .read_timeout(self.timeout)
            .user_agent(concat!("hyperbox/", env!("CARGO_PKG_VERSION")))
            .danger_accept_invalid_certs(ep.skip_verify);
        for ca in &ep.ca {
            let pem = std::fs::read(ca).map_err(|source| Error::Io {
                action: "read CA certificate",
                path: ca.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| Error::Config {
                path: ca.clone(),
                why: format!(
                    "not a PEM certificate bundle: {}",
                    hyperbox_api::error_chain(&e)
                ),
            })?;
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let c = b.build().map_err(|e| Error::Transport {
            url: ep.base.clone(),
            detail: hyperbox_api::error_chain(&e),
        })?;
        clients.insert(key, c.clone());
        Ok(c)
    }

    /// Endpoints in the order to try them, each with whether it gets
    /// retries: the upstream (last in hosts.toml order) and the endpoint that
    /// last worked do; mirrors and the HTTPS attempt on a loopback registry
    /// get one try, since the next endpoint is the better bet.
    fn endpoints(&self, r: &Reference, resolve: bool) -> Result<Vec<(Endpoint, bool)>, Error> {
        let all = self.host_endpoints(r)?;
        let mut eps: Vec<Endpoint> = all
            .into_iter()
            .filter(|e| {
                if resolve {
                    e.capabilities.resolve
                } else {
                    e.capabilities.pull
                }
            })
            .collect();
        let upstream = eps.last().map(|e| e.base.clone());
        let preferred = self
            .preferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&r.host)
            .cloned();
        if let Some(p) = &preferred
            && let Some(i) = eps.iter().position(|e| &e.base == p)
        {
            let e = eps.remove(i);
            eps.insert(0, e);
        }
        Ok(eps
            .into_iter()
            .map(|e| {
                let retry = Some(&e.base) == preferred.as_ref()
                    || (preferred.is_none() && Some(&e.base) == upstream.as_ref());
                (e, retry)
            })
            .collect())
    }

    /// The host's endpoints from hosts.toml, read at most every
    /// [`HOSTS_TTL`]: a lazy layer asks for one chunk at a time, and each
    /// request must not parse the file again.
    fn host_endpoints(&self, r: &Reference) -> Result<Vec<Endpoint>, Error> {
        let mut cache = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, eps)) = cache.get(&r.host)
            && at.elapsed() < HOSTS_TTL
        {
            return Ok(eps.clone());
        }
        let eps = hosts::endpoints(&self.config_path, &r.host, r.api_host())?;
        cache.insert(r.host.clone(), (std::time::Instant::now(), eps.clone()));
        Ok(eps)
    }

    fn worked(&self, r: &Reference, ep: &Endpoint) {
        self.preferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(r.host.clone(), ep.base.clone());
    }

    /// Credentials for the host `ep` points at, and for no other: a mirror
    /// gets the mirror's own credentials, never the upstream registry's,
    /// as containerd looks credentials up by the host a request goes to.
    /// The file is read at each challenge, so `docker login` takes effect
    /// without a restart.
    fn credentials(&self, ep: &Endpoint) -> Result<Option<Credentials>, Error> {
        let creds = DockerConfig::load(&self.docker_config)?;
        Ok(creds.get(&ep.host).cloned())
    }

    /// One request with auth: a cached `Authorization` is sent up front; a
    /// 401 is answered once with what its challenge asks for.
    async fn send(
        &self,
        ep: &Endpoint,
        r: &Reference,
        path: &str,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, Error> {
        let url = format!("{}/{}/{}", ep.base, r.repository, path);
        self.send_url(ep, r, reqwest::Method::GET, &url, headers, None)
            .await
    }

    /// [`Registry::send`] with any method, a full URL (upload locations
    /// are URLs) and an optional body.
    async fn send_url(
        &self,
        ep: &Endpoint,
        r: &Reference,
        method: reqwest::Method,
        url: &str,
        headers: HeaderMap,
        body: Option<bytes::Bytes>,
    ) -> Result<reqwest::Response, Error> {
        let client = self.client(ep)?;
        let url = url.to_string();
        let key = (ep.base.clone(), r.repository.clone());
        let mut authorization = self
            .auth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        // hosts.toml headers may carry secrets too: like Authorization, they
        // go only to the endpoint's own origin, never to a redirect target.
        let mut private = HeaderMap::new();
        for (k, v) in &ep.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes());
            let value = reqwest::header::HeaderValue::from_str(v);
            match (name, value) {
                (Ok(n), Ok(v)) => {
                    private.append(n, v);
                }
                _ => {
                    return Err(Error::Config {
                        path: self.config_path.join(&r.host).join("hosts.toml"),
                        why: format!("header {k:?} of {} is not a valid HTTP header", ep.base),
                    });
                }
            }
        }
        for attempt in 0..2 {
            let mut private = private.clone();
            if let Some(a) = &authorization {
                let v = a.parse().map_err(|_| Error::Unauthorized {
                    url: url.clone(),
                    why: "the token service returned a token that is not a header value".into(),
                })?;
                private.insert(AUTHORIZATION, v);
            }
            let resp = send_following(
                &client,
                method.clone(),
                &url,
                &headers,
                &private,
                body.clone(),
            )
            .await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenges = resp
                    .headers()
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(parse_challenges)
                    .collect::<Vec<_>>();
                let a = self.authorize(ep, r, &url, &challenges).await?;
                self.auth
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), a.clone());
                authorization = Some(a);
                continue;
            }
            return check(resp, &url).await;
        }
        unreachable!("the loop returns on its second attempt")
    }

    async fn authorize(
        &self,
        ep: &Endpoint,
        r: &Reference,
        url: &str,
        challenges: &[Challenge],
    ) -> Result<String, Error> {
        let creds = self.credentials(ep)?;
        let creds = creds.as_ref();
        let unauthorized = |why: String| Error::Unauthorized {
            url: url.into(),
            why,
        };
        // A registry offering both gets the token flow, as docker does.
        let Some(c) = challenges
            .iter()
            .find(|c| matches!(c, Challenge::Bearer { .. }))
            .or_else(|| challenges.first())
        else {
            return Err(unauthorized(
                "401 without a Basic or Bearer challenge".into(),
            ));
        };
        match c {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let scope = scope
                    .clone()
                    .unwrap_or_else(|| format!("repository:{}:pull", r.repository));
                let client = self.client(ep)?;
                let mut q: Vec<(&str, &str)> = vec![("scope", &scope)];
                if let Some(s) = service {
                    q.push(("service", s));
                }
                let token_url = reqwest::Url::parse_with_params(realm, &q)
                    .map_err(|e| unauthorized(format!("token service realm {realm:?}: {e}")))?;
                let mut private = HeaderMap::new();
                if let Some(c) = creds {
                    let raw = format!("{}:{}", c.username, c.password);
                    let v = format!("Basic {}", STANDARD.encode(raw))
                        .parse()
                        .map_err(|_| unauthorized("credentials are not a header value".into()))?;
                    private.insert(AUTHORIZATION, v);
                }
                let resp = send_following(
                    &client,
                    reqwest::Method::GET,
                    token_url.as_str(),
                    &HeaderMap::new(),
                    &private,
                    None,
                )
                .await?;
                if resp.status() == StatusCode::UNAUTHORIZED
                    || resp.status() == StatusCode::FORBIDDEN
                {
                    let who = creds.map(|c| c.username.as_str()).unwrap_or("anonymous");
                    return Err(unauthorized(format!(
                        "token service {realm} refused {who} for {scope}"
                    )));
                }
                let resp = check(resp, realm).await?;
                let bytes = read_capped(resp, MAX_TOKEN_REPLY, realm, "token reply").await?;
                let reply: TokenReply =
                    serde_json::from_slice(&bytes).map_err(|e| Error::Transport {
                        url: realm.clone(),
                        detail: format!("token reply is not JSON: {e}"),
                    })?;
                let token = reply.token.or(reply.access_token).ok_or_else(|| {
                    unauthorized(format!("token service {realm} returned no token"))
                })?;
                Ok(format!("Bearer {token}"))
            }
            Challenge::Basic => {
                let Some(c) = creds else {
                    return Err(unauthorized(format!(
                        "registry wants basic auth and no credentials for {} are configured",
                        ep.host
                    )));
                };
                let raw = format!("{}:{}", c.username, c.password);
                Ok(format!("Basic {}", STANDARD.encode(raw)))
            }
        }
    }

    /// Runs `op` on each endpoint in turn, retrying transient failures with
    /// backoff; an endpoint that lacks the object or refuses us passes the
    /// call to the next.
    async fn across<T, F, Fut>(&self, r: &Reference, resolve: bool, mut op: F) -> Result<T, Error>
    where
        F: FnMut(Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let mut failed = Vec::new();
        for (ep, retry) in self.endpoints(r, resolve)? {
            let retries = if retry { self.retries } else { 0 };
            let mut backoff = FIRST_BACKOFF;
            for attempt in 0..=retries {
                match op(ep.clone()).await {
                    Ok(v) => {
                        self.worked(r, &ep);
                        return Ok(v);
                    }
                    Err(e) if e.is_transient() && attempt < retries => {
                        tracing::warn!(error = %e, attempt, endpoint = %ep.base, "transient registry error; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Err(e) if e.is_unreachable() || e.is_transient() => {
                        tracing::debug!(error = %e, endpoint = %ep.base, "endpoint failed; trying the next");
                        failed.push(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(combine(failed, r, "this capability"))
    }

    /// A manifest or index by tag or digest: bytes, media type, digest.
    pub async fn fetch_manifest(
        &self,
        r: &Reference,
        object: &str,
    ) -> Result<(Vec<u8>, String, Digest), Error> {
        let by_digest = object.starts_with("sha256:");
        let expected = if by_digest {
            Some(Digest::parse(object)?)
        } else {
            None
        };
        self.across(r, !by_digest, |ep| {
            let expected = expected.clone();
            async move {
                let mut h = HeaderMap::new();
                h.insert(ACCEPT, MANIFEST_TYPES.parse().expect("static header"));
                let resp = self.send(&ep, r, &format!("manifests/{object}"), h).await?;
                let media_type = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let url = shown(resp.url());
                let bytes = read_capped(resp, MAX_MANIFEST, &url, "manifest").await?;
                let digest = match expected {
                    Some(d) => {
                        let mut v = Verifier::default();
                        v.update(&bytes);
                        v.finish(&d, &format!("manifest {r}"))?;
                        d
                    }
                    None => Digest::of(&bytes),
                };
                Ok((bytes, media_type, digest))
            }
        })
        .await
    }

    /// A small blob (an image config) in memory, verified.
    pub async fn fetch_blob_bytes(&self, r: &Reference, digest: &Digest) -> Result<Vec<u8>, Error> {
        self.across(r, false, |ep| async move {
            let resp = self
                .send(&ep, r, &format!("blobs/{digest}"), HeaderMap::new())
                .await?;
            let url = shown(resp.url());
            let bytes = read_capped(resp, MAX_CONFIG, &url, "blob").await?;
            let mut v = Verifier::default();
            v.update(&bytes);
            v.finish(digest, &format!("blob {digest} of {r}"))?;
            Ok(bytes)
        })
        .await
    }

    /// The layer descriptors of `r` on this machine's platform, from its
    /// verified manifest (the config is not fetched): what each layer blob's
    /// size must be.
    pub async fn layer_descriptors(&self, r: &Reference) -> Result<Vec<Descriptor>, Error> {
        let (_, _, _, _, m) = self.resolve_manifest(r).await?;
        Ok(m.layers)
    }

    /// Resolves `r` to this machine's platform: the manifest, the config
    /// and the layer list, all verified.
    pub async fn resolve(&self, r: &Reference) -> Result<Resolved, Error> {
        let bad = |why: String| Error::Manifest {
            reference: r.to_string(),
            why,
        };
        let (top, top_bytes, manifest, manifest_bytes, m) = self.resolve_manifest(r).await?;
        let config_digest = Digest::parse(&m.config.digest)?;
        let config_bytes = self.fetch_blob_bytes(r, &config_digest).await?;
        let c: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| bad(format!("config: {e}")))?;
        if c.rootfs.diff_ids.len() != m.layers.len() {
            return Err(bad(format!(
                "{} layers but {} diff_ids in the config",
                m.layers.len(),
                c.rootfs.diff_ids.len()
            )));
        }
        Ok(Resolved {
            reference: r.clone(),
            top,
            top_bytes,
            manifest,
            manifest_bytes,
            config: m.config,
            config_bytes,
            layers: m.layers,
            diff_ids: c.rootfs.diff_ids,
        })
    }

    /// `r`'s top object and this platform's manifest, fetched and
    /// verified, with the manifest parsed and its layer digests checked.
    async fn resolve_manifest(
        &self,
        r: &Reference,
    ) -> Result<(Descriptor, Vec<u8>, Descriptor, Vec<u8>, Manifest), Error> {
        let bad = |why: String| Error::Manifest {
            reference: r.to_string(),
            why,
        };
        let (top_bytes, top_type, top_digest) = self.fetch_manifest(r, r.object()).await?;
        let top_json: serde_json::Value = serde_json::from_slice(&top_bytes)
            .map_err(|e| bad(format!("manifest is not JSON: {e}")))?;
        let top_type = if top_type.is_empty() || top_type == "application/json" {
            top_json["mediaType"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        } else {
            top_type
        };
        let top = Descriptor {
            media_type: top_type.clone(),
            digest: top_digest.to_string(),
            size: top_bytes.len() as i64,
            annotations: HashMap::new(),
        };
        let is_index = top_type.contains("index")
            || top_type.contains("manifest.list")
            || top_json.get("manifests").is_some();
        let (manifest, manifest_bytes) = if is_index {
            let index: Index =
                serde_json::from_value(top_json).map_err(|e| bad(format!("index: {e}")))?;
            let arch = host_arch();
            let chosen = index
                .manifests
                .into_iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == arch)
                })
                .ok_or_else(|| bad(format!("index has no linux/{arch} manifest")))?;
            let (bytes, t, d) = self.fetch_manifest(r, &chosen.desc.digest).await?;
            let mut desc = chosen.desc;
            if desc.media_type.is_empty() {
                desc.media_type = t;
            }
            desc.digest = d.to_string();
            (desc, bytes)
        } else {
            (top.clone(), top_bytes.clone())
        };
        let m: Manifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| bad(format!("manifest: {e}")))?;
        for l in &m.layers {
            Digest::parse(&l.digest)?;
            if l.size < 0 {
                return Err(bad(format!("layer {} has a negative size", l.digest)));
            }
        }
        Ok((top, top_bytes, manifest, manifest_bytes, m))
    }

    /// Downloads blob `digest` of `r` into `path`, resuming a partial file
    /// left there, and verifies it; on a mismatch the file is removed.
    /// Never reads past `size`: a reply that announces more is refused
    /// before its body is read, one that streams more (chunked, no
    /// length) when it crosses it. Waits for a download slot first
    /// (`max_concurrent_downloads`).
    pub async fn fetch_blob_to_file(
        &self,
        r: &Reference,
        digest: &Digest,
        size: BlobSize,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<u64, Error> {
        self.fetch_blob_to_file_paced(r, digest, size, path, progress, None)
            .await
    }

    /// [`Registry::fetch_blob_to_file`], reading the body only as `pace`
    /// lets it ([`Pace`]), and without a download slot (the caller bounds
    /// its paced downloads).
    pub async fn fetch_blob_to_file_paced(
        &self,
        r: &Reference,
        digest: &Digest,
        size: BlobSize,
        path: &Path,
        progress: Progress<'_>,
        pace: Option<Pace>,
    ) -> Result<u64, Error> {
        // A paced download spends most of its time paused: it holds no
        // slot, or a few of them would hold up every pull on the node (its
        // caller bounds how many run).
        let _slot = match pace {
            Some(_) => None,
            None => Some(
                self.downloads
                    .acquire()
                    .await
                    .expect("the download semaphore is never closed"),
            ),
        };
        // A mismatch after a resumed download may come from mixing two
        // sources; one fresh download settles it.
        for fresh in [false, true] {
            if fresh {
                remove(path)?;
            }
            let mut v = prefix_verifier(path).await?;
            if v.len() > size.limit() {
                // Left by an earlier run without this bound: not the blob.
                remove(path)?;
                v = Verifier::default();
            }
            if !(matches!(size, BlobSize::Exact(n) if n == v.len() && n > 0)) {
                let got = self
                    .download_across(r, digest, size, path, &mut v, progress, pace.as_ref())
                    .await;
                if let Err(Error::Stopped { .. }) = &got {
                    remove(path)?;
                }
                got?;
            }
            let len = v.len();
            match v.finish(digest, &format!("blob {digest} of {r}")) {
                Ok(()) => return Ok(len),
                Err(e) if !fresh => {
                    tracing::warn!(error = %e, "downloaded blob does not verify; downloading again from the start");
                }
                Err(e) => {
                    remove(path)?;
                    return Err(e);
                }
            }
        }
        unreachable!("the second pass returns")
    }

    /// [`Registry::across`] for a download, whose verifier carries over
    /// between attempts so each retry resumes where the last one stopped.
    #[allow(clippy::too_many_arguments)]
    async fn download_across(
        &self,
        r: &Reference,
        digest: &Digest,
        size: BlobSize,
        path: &Path,
        v: &mut Verifier,
        progress: Progress<'_>,
        pace: Option<&Pace>,
    ) -> Result<(), Error> {
        let mut failed = Vec::new();
        for (ep, retry) in self.endpoints(r, false)? {
            let retries = if retry { self.retries } else { 0 };
            let mut backoff = FIRST_BACKOFF;
            // Attempts in a row that brought little: one that got at least
            // RETRY_PROGRESS beyond the most this endpoint ever had (a 200
            // to a Range request starts the file over, and getting back
            // there is not progress) starts the count and the backoff
            // again. A large layer on a link that drops now and then still
            // arrives; a registry that keeps failing at once, or dribbles a
            // few bytes per connection, is given up. An endpoint without
            // retries (a mirror) hands over at its first failure either way.
            let mut attempt = 0;
            let mut mark = v.len();
            loop {
                let result = self
                    .download(&ep, r, digest, size, path, v, progress, pace)
                    .await;
                if v.len() >= mark + RETRY_PROGRESS {
                    attempt = 0;
                    backoff = FIRST_BACKOFF;
                }
                mark = mark.max(v.len());
                match result {
                    Ok(()) => {
                        self.worked(r, &ep);
                        return Ok(());
                    }
                    Err(e) if e.is_transient() && attempt < retries => {
                        tracing::warn!(error = %e, attempt, have = v.len(), "download interrupted; resuming");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        attempt += 1;
                    }
                    Err(e) if e.is_unreachable() || e.is_transient() => {
                        failed.push(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(combine(failed, r, "the pull capability"))
    }

    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        ep: &Endpoint,
        r: &Reference,
        digest: &Digest,
        size: BlobSize,
        path: &Path,
        v: &mut Verifier,
        progress: Progress<'_>,
        pace: Option<&Pace>,
    ) -> Result<(), Error> {
        let io = |action, source| Error::Io {
            action,
            path: path.into(),
            source,
        };
        let have = v.len();
        let mut h = HeaderMap::new();
        if have > 0 {
            h.insert(RANGE, format!("bytes={have}-").parse().expect("ascii"));
        }
        let resp = match self.send(ep, r, &format!("blobs/{digest}"), h).await {
            // Everything is here already: the registry says so for a range
            // past the end.
            Err(Error::Status { status: 416, .. }) if have > 0 => return Ok(()),
            other => other?,
        };
        let url = shown(resp.url());
        let resumed = resp.status() == StatusCode::PARTIAL_CONTENT;
        // The most body bytes this reply may carry: what it announced.
        let mut announced = resp.content_length();
        if resumed {
            let span = content_range(&resp);
            if span.map(|(start, _)| start) != Some(have) {
                return Err(Error::Status {
                    url,
                    status: 206,
                    body: format!(
                        "range reply covers {}, asked for bytes {have}-",
                        describe_range(&resp)
                    ),
                });
            }
            if let Some((start, end)) = span {
                let n = end - start + 1;
                if announced.is_some_and(|a| a != n) {
                    return Err(Error::Status {
                        url,
                        status: 206,
                        body: format!(
                            "range reply announces {} bytes for {}",
                            announced.unwrap_or_default(),
                            describe_range(&resp)
                        ),
                    });
                }
                announced = Some(n);
            }
        }
        let too_long = || Error::BlobTooLong {
            url: url.clone(),
            limit: size.limit(),
            why: size.why(),
        };
        let keep = if have > 0 && resumed { have } else { 0 };
        if announced.is_some_and(|n| n.saturating_add(keep) > size.limit()) {
            return Err(too_long());
        }
        let mut file = if keep > 0 {
            tokio::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .await
                .map_err(|e| io("open", e))?
        } else {
            // A full reply (the registry ignored Range): start over.
            *v = Verifier::default();
            tokio::fs::File::create(path)
                .await
                .map_err(|e| io("create", e))?
        };
        let total = announced.map(|n| n + v.len()).or(match size {
            BlobSize::Exact(n) => Some(n),
            BlobSize::AtMost(_) => None,
        });
        let mut body = resp.bytes_stream();
        let mut result = Ok(());
        loop {
            if let Some(p) = pace
                && !p(v.len()).await
            {
                result = Err(Error::Stopped {
                    url: url.clone(),
                    read: v.len(),
                });
                break;
            }
            let Some(chunk) = body.next().await else {
                break;
            };
            match chunk {
                Ok(c) => {
                    if v.len() + c.len() as u64 > size.limit() {
                        result = Err(too_long());
                        break;
                    }
                    if let Some(t) = total
                        && v.len() + c.len() as u64 > t
                    {
                        result = Err(Error::TooLarge {
                            url: url.clone(),
                            what: "blob reply",
                            limit: announced.unwrap_or_default(),
                        });
                        break;
                    }
                    if let Err(e) = file.write_all(&c).await {
                        result = Err(io("write", e));
                        break;
                    }
                    v.update(&c);
                    progress(v.len(), total);
                }
                Err(e) => {
                    result = Err(Error::Transport {
                        url: url.clone(),
                        detail: format!(
                            "after {} bytes: {}",
                            v.len(),
                            hyperbox_api::error_chain(&e)
                        ),
                    });
                    break;
                }
            }
        }
        // Whatever arrived is kept for the next attempt's Range request.
        file.flush().await.map_err(|e| io("write", e))?;
        file.sync_data().await.map_err(|e| io("sync", e))?;
        result?;
        if let Some(t) = total
            && v.len() < t
        {
            return Err(Error::Transport {
                url,
                detail: format!("body ended after {} of {t} bytes", v.len()),
            });
        }
        Ok(())
    }
}

impl Registry {
    /// The hyperbox index of the image whose manifest is `manifest`, if
    /// one was pushed (see [`crate::index`]).
    pub async fn fetch_index(
        &self,
        r: &Reference,
        manifest: &Digest,
    ) -> Result<Option<crate::index::Index>, Error> {
        let tag = crate::index::tag_for(manifest);
        let what = format!("{r} index");
        match self
            .fetch_artifact(
                r,
                &tag,
                crate::index::CONFIG_TYPE,
                crate::index::MAX_DOCUMENT,
                &what,
            )
            .await?
        {
            Some((doc, _)) => crate::index::Index::parse(&doc, &what).map(Some),
            None => Ok(None),
        }
    }

    /// The prefetch lists shared for the image with manifest `manifest`
    /// (`crate::prefetch`), if any were pushed.
    pub async fn fetch_prefetch(
        &self,
        r: &Reference,
        manifest: &Digest,
    ) -> Result<Option<crate::prefetch::Shared>, Error> {
        let tag = crate::prefetch::tag_for(manifest);
        let what = format!("{r} prefetch lists");
        match self
            .fetch_artifact(
                r,
                &tag,
                crate::prefetch::CONFIG_TYPE,
                crate::prefetch::MAX_DOCUMENT,
                &what,
            )
            .await?
        {
            Some((doc, layers)) => {
                let mut shared = crate::prefetch::Shared::parse(&doc, &what)?;
                for l in &layers {
                    match crate::prefetch::PointsRef::of(
                        &l.media_type,
                        &l.digest,
                        l.size,
                        &l.annotations,
                    ) {
                        Ok(Some(p)) if !shared.points.iter().any(|q| q.layer == p.layer) => {
                            shared.points.push(p)
                        }
                        Ok(_) => {}
                        // Only a better place to start reads: the lists
                        // still serve without it.
                        Err(why) => {
                            tracing::warn!(artifact = what, why, "learned checkpoints ignored")
                        }
                    }
                }
                Ok(Some(shared))
            }
            None => Ok(None),
        }
    }

    /// The config document of the artifact tagged `tag` when its config is
    /// of `config_type` and at most `max` bytes, and the artifact's layers;
    /// `None` when the tag is absent or holds something else.
    async fn fetch_artifact(
        &self,
        r: &Reference,
        tag: &str,
        config_type: &str,
        max: u64,
        what: &str,
    ) -> Result<Option<(Vec<u8>, Vec<Descriptor>)>, Error> {
        let (bytes, _, _) = match self.fetch_manifest(r, tag).await {
            Ok(m) => m,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Manifest {
            reference: what.into(),
            why: format!("manifest: {e}"),
        })?;
        if m.config.media_type != config_type {
            return Ok(None);
        }
        if m.config.size > max as i64 {
            return Err(Error::Manifest {
                reference: what.into(),
                why: format!("document of {} bytes, more than {max}", m.config.size),
            });
        }
        let d = Digest::parse(&m.config.digest)?;
        let doc = self.fetch_blob_bytes(r, &d).await?;
        Ok(Some((doc, m.layers)))
    }

    /// Bytes `start..start+len` of blob `digest`, unverified (the caller
    /// checks them against a chunk digest). Not subject to the download
    /// limit: these are reads a process waits for.
    pub async fn fetch_range(
        &self,
        r: &Reference,
        digest: &Digest,
        start: u64,
        len: u64,
    ) -> Result<bytes::Bytes, Error> {
        self.across(r, false, |ep| async move {
            let mut h = HeaderMap::new();
            h.insert(
                RANGE,
                format!("bytes={start}-{}", start + len - 1)
                    .parse()
                    .expect("ascii"),
            );
            let resp = self.send(&ep, r, &format!("blobs/{digest}"), h).await?;
            let url = shown(resp.url());
            if resp.status() != StatusCode::PARTIAL_CONTENT {
                return Err(Error::Status {
                    url,
                    status: resp.status().as_u16(),
                    body: "the registry ignored the Range request; lazy pulls need Range support"
                        .into(),
                });
            }
            // Exactly the bytes asked for, announced as such; the body is
            // never read past them.
            if content_range(&resp) != Some((start, start + len - 1))
                || resp.content_length().is_some_and(|n| n != len)
            {
                return Err(Error::Status {
                    url,
                    status: 206,
                    body: format!(
                        "range reply covers {} ({} bytes announced), asked for bytes {start}-{}",
                        describe_range(&resp),
                        resp.content_length()
                            .map_or_else(|| "no length".to_string(), |n| n.to_string()),
                        start + len - 1
                    ),
                });
            }
            let cap = usize::try_from(len).unwrap_or(usize::MAX);
            let b = read_capped(resp, cap, &url, "range reply").await?;
            if b.len() as u64 != len {
                return Err(Error::Transport {
                    url,
                    detail: format!("range reply of {} bytes, asked for {len}", b.len()),
                });
            }
            Ok(bytes::Bytes::from(b))
        })
        .await
    }

    /// Uploads `data` as blob `digest` of `r`'s repository unless the
    /// registry has it (monolithic upload: POST, then PUT with the digest).
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        data: bytes::Bytes,
    ) -> Result<(), Error> {
        let ep = self.push_endpoint(r)?;
        let head = format!("{}/{}/blobs/{digest}", ep.base, r.repository);
        match self
            .send_url(&ep, r, reqwest::Method::HEAD, &head, HeaderMap::new(), None)
            .await
        {
            Ok(_) => return Ok(()),
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let start = format!("{}/{}/blobs/uploads/", ep.base, r.repository);
        let resp = self
            .send_url(
                &ep,
                r,
                reqwest::Method::POST,
                &start,
                HeaderMap::new(),
                Some(bytes::Bytes::new()),
            )
            .await?;
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Status {
                url: start.clone(),
                status: resp.status().as_u16(),
                body: "upload started without a Location".into(),
            })?
            .to_string();
        let location = if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else {
            // Relative to the registry's origin.
            let origin: String = ep.base.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
            format!("{origin}{location}")
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={digest}");
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::CONTENT_TYPE,
            "application/octet-stream".parse().expect("static"),
        );
        self.send_url(&ep, r, reqwest::Method::PUT, &put, h, Some(data))
            .await?;
        Ok(())
    }

    /// Puts manifest `bytes` of `media_type` under `tag`.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        tag: &str,
        media_type: &str,
        bytes: bytes::Bytes,
    ) -> Result<(), Error> {
        let ep = self.push_endpoint(r)?;
        let url = format!("{}/{}/manifests/{tag}", ep.base, r.repository);
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::CONTENT_TYPE,
            media_type.parse().map_err(|_| Error::Manifest {
                reference: r.to_string(),
                why: format!("media type {media_type:?} is not a header value"),
            })?,
        );
        self.send_url(&ep, r, reqwest::Method::PUT, &url, h, Some(bytes))
            .await?;
        Ok(())
    }

    /// Pushes an artifact referring to `subject` under `tag`: `doc` (of
    /// media type `config_type`, which is also the artifact type) as its
    /// config, and `layers`, which must be pushed already; with no layers,
    /// the empty descriptor, as OCI 1.1 asks of artifacts without any.
    /// Returns the manifest's digest.
    pub async fn push_artifact(
        &self,
        r: &Reference,
        tag: &str,
        config_type: &str,
        doc: Vec<u8>,
        layers: &[Descriptor],
        subject: &Descriptor,
    ) -> Result<Digest, Error> {
        const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
        let doc_digest = Digest::of(&doc);
        let doc_len = doc.len();
        self.push_blob(r, &doc_digest, bytes::Bytes::from(doc))
            .await?;
        let descriptor = |media_type: &str, digest: &str, size: i64| serde_json::json!({ "mediaType": media_type, "digest": digest, "size": size });
        let mut listed: Vec<serde_json::Value> = layers
            .iter()
            .map(|l| {
                let mut d = descriptor(&l.media_type, &l.digest, l.size);
                if !l.annotations.is_empty() {
                    d["annotations"] = serde_json::json!(l.annotations);
                }
                d
            })
            .collect();
        if listed.is_empty() {
            let empty = Digest::of(b"{}");
            self.push_blob(r, &empty, bytes::Bytes::from_static(b"{}"))
                .await?;
            listed.push(descriptor(EMPTY_TYPE, &empty.to_string(), 2));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": config_type,
            "config": descriptor(config_type, &doc_digest.to_string(), doc_len as i64),
            "layers": listed,
            "subject": descriptor(&subject.media_type, &subject.digest, subject.size),
        });
        let bytes = serde_json::to_vec(&manifest).expect("JSON values serialize");
        let digest = Digest::of(&bytes);
        self.push_manifest(r, tag, OCI_MANIFEST, bytes::Bytes::from(bytes))
            .await?;
        Ok(digest)
    }

    /// Pushes go to the upstream (the last endpoint), never to a mirror;
    /// on loopback, to whichever scheme pulls used last.
    fn push_endpoint(&self, r: &Reference) -> Result<Endpoint, Error> {
        let eps = self.endpoints(r, true)?;
        eps.iter()
            .find(|(_, retry)| *retry)
            .or(eps.last())
            .map(|(e, _)| e.clone())
            .ok_or_else(|| Error::NotFound {
                url: format!("{} (no endpoint to push to)", r.host),
            })
    }
}

/// One endpoint's error as it is; several as one error listing each, so the
/// informative one (a certificate problem) is not hidden behind the last
/// (the plain-HTTP retry's 400). When every endpoint that answered said 404
/// and the rest could not be reached (a dead mirror, HTTPS tried on a
/// plain-HTTP loopback registry), the answer is a 404.
fn combine(mut failed: Vec<Error>, r: &Reference, capability: &str) -> Error {
    let not_found = |e: &Error| matches!(e, Error::NotFound { .. });
    match failed.len() {
        0 => Error::NotFound {
            url: format!("{} (no endpoint with {capability})", r.host),
        },
        1 => failed.remove(0),
        _ if failed.iter().any(not_found)
            && failed
                .iter()
                .all(|e| not_found(e) || matches!(e, Error::Transport { .. })) =>
        {
            let i = failed.iter().position(not_found).expect("one is a 404");
            failed.remove(i)
        }
        _ => Error::AllEndpoints {
            errors: failed.iter().map(|e| e.to_string()).collect(),
        },
    }
}

fn remove(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            action: "remove",
            path: path.into(),
            source,
        }),
    }
}

/// A verifier primed with the bytes a partial file already holds.
async fn prefix_verifier(path: &Path) -> Result<Verifier, Error> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut v = Verifier::default();
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
            Err(source) => {
                return Err(Error::Io {
                    action: "open",
                    path,
                    source,
                });
            }
        };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).map_err(|source| Error::Io {
                action: "read",
                path: path.clone(),
                source,
            })?;
            if n == 0 {
                return Ok(v);
            }
            v.update(&buf[..n]);
        }
    })
    .await
    .expect("hashing does not panic")
}

async fn check(resp: reqwest::Response, url: &str) -> Result<reqwest::Response, Error> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = read_prefix(resp, MAX_ERROR_BODY).await;
    let body: String = String::from_utf8_lossy(&body).chars().take(300).collect();
    Err(match status {
        StatusCode::NOT_FOUND => Error::NotFound { url: url.into() },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Unauthorized {
            url: url.into(),
            why: format!("HTTP {}: {}", status.as_u16(), body.trim()),
        },
        _ => Error::Status {
            url: url.into(),
            status: status.as_u16(),
            body: body.trim().to_string(),
        },
    })
}

/// The body of `resp`, at most `cap` bytes: a longer body (announced or
/// streamed) is a [`Error::TooLarge`], and its rest is never read. hyper
/// itself never reads past an announced Content-Length.
async fn read_capped(
    resp: reqwest::Response,
    cap: usize,
    url: &str,
    what: &'static str,
) -> Result<Vec<u8>, Error> {
    let too_large = || Error::TooLarge {
        url: url.into(),
        what,
        limit: cap as u64,
    };
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(c) = body.next().await {
        let c = c.map_err(|e| Error::Transport {
            url: url.into(),
            detail: hyperbox_api::error_chain(&e),
        })?;
        if out.len() + c.len() > cap {
            return Err(too_large());
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

/// Up to `cap` bytes of the body of `resp` (an error reply, read for its
/// message); the rest is dropped unread, and so is a body that breaks.
async fn read_prefix(resp: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while out.len() < cap {
        match body.next().await {
            Some(Ok(c)) => {
                let room = cap - out.len();
                out.extend_from_slice(&c[..c.len().min(room)]);
            }
            Some(Err(_)) | None => break,
        }
    }
    out
}

/// `(first, last)` of a reply's `Content-Range: bytes first-last/total`.
fn content_range(resp: &reqwest::Response) -> Option<(u64, u64)> {
    let v = resp.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let span = v.strip_prefix("bytes ")?.split('/').next()?;
    let (a, b) = span.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

/// A reply's Content-Range for messages.
fn describe_range(resp: &reqwest::Response) -> String {
    match resp.headers().get(CONTENT_RANGE) {
        None => "no Content-Range".into(),
        Some(v) => format!("{:?}", String::from_utf8_lossy(v.as_bytes())),
    }
}

/// `url` for messages and logs: without user info or query, where
/// redirect targets (pre-signed storage URLs) carry their credentials.
fn shown(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    if u.query().is_none() {
        return u.to_string();
    }
    u.set_query(None);
    format!("{u}?…")
}

/// Whether `a` and `b` are the same origin (scheme, host, port).
fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Sends one request and follows its redirects (up to [`MAX_REDIRECTS`]).
/// `public` headers (Accept, Range) go to every hop; `private` ones
/// (Authorization, hosts.toml `header`) only to hops on the origin of
/// `url`: a registry that redirects a blob to storage on another host
/// never hands that host our credentials.
async fn send_following(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    public: &HeaderMap,
    private: &HeaderMap,
    body: Option<bytes::Bytes>,
) -> Result<reqwest::Response, Error> {
    let home = reqwest::Url::parse(url).map_err(|e| Error::Transport {
        url: url.into(),
        detail: format!("invalid URL: {e}"),
    })?;
    let (mut method, mut body, mut at) = (method, body, home.clone());
    for _ in 0..=MAX_REDIRECTS {
        let mut req = client.request(method.clone(), at.clone());
        req = req.headers(public.clone());
        if same_origin(&home, &at) {
            req = req.headers(private.clone());
        }
        if let Some(b) = &body {
            req = req.body(b.clone());
        }
        let resp = req.send().await.map_err(|e| Error::Transport {
            url: shown(&at),
            detail: hyperbox_api::error_chain(&e).replace(at.as_str(), &shown(&at)),
        })?;
        let status = resp.status();
        if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
            return Ok(resp);
        }
        let refused = |why: String| Error::Redirect {
            url: shown(&at),
            why,
        };
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| refused(format!("HTTP {} without a Location", status.as_u16())))?;
        let next = at
            .join(location)
            .map_err(|e| refused(format!("Location {location:?}: {e}")))?;
        if !matches!(next.scheme(), "http" | "https") {
            return Err(refused(format!("Location {location:?} is not HTTP")));
        }
        // As browsers and Go do: 303, and 301/302 after anything but GET
        // or HEAD, continue as a GET without a body.
        if status == StatusCode::SEE_OTHER
            || (matches!(status.as_u16(), 301 | 302)
                && method != reqwest::Method::GET
                && method != reqwest::Method::HEAD)
        {
            method = reqwest::Method::GET;
            body = None;
        }
        tracing::debug!(from = %shown(&at), to = %shown(&next), "following a redirect");
        at = next;
    }
    Err(Error::Redirect {
        url: url.into(),
        why: format!("more than {MAX_REDIRECTS} redirects"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Reference {
        Reference::parse("127.0.0.1:5000/app:v1").unwrap()
    }

    fn transport() -> Error {
        Error::Transport {
            url: "https://127.0.0.1:5000/v2".into(),
            detail: "received corrupt message".into(),
        }
    }

    fn not_found() -> Error {
        Error::NotFound {
            url: "http://127.0.0.1:5000/v2/app/manifests/x".into(),
        }
    }

    #[test]
    fn a_404_behind_an_unreachable_endpoint_is_a_404() {
        assert!(matches!(
            combine(vec![transport(), not_found()], &r(), "x"),
            Error::NotFound { .. }
        ));
    }

    #[test]
    fn other_failures_are_reported_per_endpoint() {
        let status = Error::Status {
            url: "http://127.0.0.1:5000/v2".into(),
            status: 400,
            body: "Client sent an HTTP request to an HTTPS server.".into(),
        };
        let e = combine(vec![transport(), status], &r(), "x").to_string();
        assert!(
            e.contains("corrupt message") && e.contains("HTTP 400"),
            "{e}"
        );
    }
}
