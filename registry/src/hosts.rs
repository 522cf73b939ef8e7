//! containerd's registry host configuration (`hosts.toml`), read the way
//! containerd 1.7 and 2.x read it, so one directory configures both.
//!
//! `<config_path>/<host>/hosts.toml` (else `<config_path>/_default/hosts.toml`)
//! lists mirrors as `[host."<url>"]` tables, tried in file order, then the
//! upstream `server`. Without a file the upstream is `https://<host>`; for
//! loopback hosts plain HTTP is tried after HTTPS, as containerd does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::Error;

/// What an endpoint may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch blobs and manifests by digest.
    pub pull: bool,
    /// Resolve tags to digests.
    pub resolve: bool,
}

/// One place to send requests for a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Base URL up to and including `/v2` (or the override path).
    pub base: String,
    /// The endpoint's `host[:port]`, for credentials.
    pub host: String,
    /// What it may be used for.
    pub capabilities: Capabilities,
    /// Extra CA certificates (PEM files).
    pub ca: Vec<PathBuf>,
    /// Accept any certificate.
    pub skip_verify: bool,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct HostTable {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    skip_verify: Option<bool>,
    header: Option<BTreeMap<String, OneOrMany>>,
    override_path: Option<bool>,
    // Client certificates: parsed so the error can say they are unsupported.
    client: Option<toml::Value>,
}

/// The file: `server`, the upstream's own settings at top level, and
/// `[host."url"]` tables in file order (toml's `preserve_order` keeps it).
#[derive(Debug, Default)]
struct File {
    server: Option<String>,
    top: HostTable,
    hosts: Vec<(String, HostTable)>,
}

impl File {
    fn parse(text: &str) -> Result<File, String> {
        let mut t: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let server = match t.remove("server") {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(v) => {
                return Err(format!(
                    "server: expected a URL string, found {}",
                    v.type_str()
                ));
            }
        };
        let mut hosts = Vec::new();
        match t.remove("host") {
            None => {}
            Some(toml::Value::Table(h)) => {
                for (url, v) in h {
                    let ht = HostTable::deserialize(v)
                        .map_err(|e| format!("host.{url:?}: {}", e.to_string().trim_end()))?;
                    hosts.push((url, ht));
                }
            }
            Some(v) => return Err(format!("host: expected tables, found {}", v.type_str())),
        }
        let top = HostTable::deserialize(toml::Value::Table(t))
            .map_err(|e| e.to_string().trim_end().to_string())?;
        Ok(File { server, top, hosts })
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

fn is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

fn endpoint(url: &str, t: &HostTable, dir: &Path) -> Result<Endpoint, Error> {
    let bad = |why: String| Error::Config {
        path: dir.join("hosts.toml"),
        why,
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad(format!("{url:?}: expected http:// or https://")))?;
    if scheme != "http" && scheme != "https" {
        return Err(bad(format!("{url:?}: expected http:// or https://")));
    }
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    if host.is_empty() {
        return Err(bad(format!("{url:?}: no host")));
    }
    let path = if t.override_path.unwrap_or(false) || path.ends_with("/v2") {
        path
    } else {
        format!("{path}/v2")
    };
    let caps = match &t.capabilities {
        None => Capabilities {
            pull: true,
            resolve: true,
        },
        Some(c) => {
            for x in c {
                if !matches!(x.as_str(), "pull" | "resolve" | "push") {
                    return Err(bad(format!("{url:?}: unknown capability {x:?}")));
                }
            }
            Capabilities {
                pull: c.iter().any(|x| x == "pull"),
                resolve: c.iter().any(|x| x == "resolve"),
            }
        }
    };
    if t.client.is_some() {
        return Err(bad(format!(
            "{url:?}: client certificates are not supported by hyperbox yet; \
             remove `client` or serve this host without mTLS"
        )));
    }
    let ca =
        t.ca.clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let p = PathBuf::from(p);
                if p.is_absolute() { p } else { dir.join(p) }
            })
            .collect();
    let headers = t
        .header
        .clone()
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(k, v)| v.into_vec().into_iter().map(move |v| (k.clone(), v)))
        .collect();
    Ok(Endpoint {
        base: format!("{scheme}://{host}{path}"),
        host: host.to_string(),
        capabilities: caps,
        ca,
        skip_verify: t.skip_verify.unwrap_or(false),
        headers,
    })
}

/// The endpoints for registry `host` (as named in the image reference,
/// `api_host` being where its API lives), in the order to try them.
pub fn endpoints(config_path: &Path, host: &str, api_host: &str) -> Result<Vec<Endpoint>, Error> {
    let mut file = None;
    for name in [host, "_default"] {
        let dir = config_path.join(name);
        let p = dir.join("hosts.toml");
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                file = Some((dir, text));
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {}
            Err(source) => {
                return Err(Error::Io {
                    action: "read",
                    path: p,
                    source,
                });
            }
        }
    }
    let default_server = |dir: &Path, t: &HostTable| -> Result<Vec<Endpoint>, Error> {
        let mut v = vec![endpoint(&format!("https://{api_host}"), t, dir)?];
        if is_loopback(api_host) {
            v.push(endpoint(&format!("http://{api_host}"), t, dir)?);
        }
        Ok(v)
    };
    let Some((dir, text)) = file else {
        return default_server(config_path, &HostTable::default());
    };
    let f = File::parse(&text).map_err(|why| Error::Config {
        path: dir.join("hosts.toml"),
        why,
    })?;
    let mut out = Vec::new();
    for (url, t) in &f.hosts {
        out.push(endpoint(url, t, &dir)?);
    }
    match &f.server {
        Some(s) => out.push(endpoint(s, &f.top, &dir)?),
        None => out.extend(default_server(&dir, &f.top)?),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, host: &str, text: &str) {
        let d = dir.join(host);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts.toml"), text).unwrap();
    }

    #[test]
    fn without_a_file_upstream_is_https_and_loopback_also_tries_http() {
        let d = tempfile::tempdir().unwrap();
        let e = endpoints(d.path(), "docker.io", "registry-1.docker.io").unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].base, "https://registry-1.docker.io/v2");
        let e = endpoints(d.path(), "127.0.0.1:5000", "127.0.0.1:5000").unwrap();
        let bases: Vec<_> = e.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(
            bases,
            ["https://127.0.0.1:5000/v2", "http://127.0.0.1:5000/v2"]
        );
        assert!(is_loopback("localhost:5000") && is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
    }

    #[test]
    fn mirrors_come_first_in_file_order_then_the_server() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "docker.io",
            r#"
server = "https://registry-1.docker.io"
[host."https://z-mirror.example"]
  capabilities = ["pull"]
  ca = "z.pem"
[host."http://a-mirror.example:5000/prefix"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  header = { x-token = "t" }
[host."https://override.example/custom"]
  override_path = true
"#,
        );
        let e = endpoints(d.path(), "docker.io", "registry-1.docker.io").unwrap();
        let bases: Vec<_> = e.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(
            bases,
            [
                "https://z-mirror.example/v2",
                "http://a-mirror.example:5000/prefix/v2",
                "https://override.example/custom",
                "https://registry-1.docker.io/v2"
            ]
        );
        assert!(e[0].capabilities.pull && !e[0].capabilities.resolve);
        assert_eq!(e[0].ca, [d.path().join("docker.io/z.pem")]);
        assert!(e[1].skip_verify);
        assert_eq!(e[1].headers, [("x-token".to_string(), "t".to_string())]);
        assert_eq!(e[1].host, "a-mirror.example:5000");
    }

    #[test]
    fn default_dir_applies_to_hosts_without_their_own() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "_default",
            "server = \"http://fallback.example\"\n",
        );
        let e = endpoints(d.path(), "quay.io", "quay.io").unwrap();
        assert_eq!(e[0].base, "http://fallback.example/v2");
    }

    #[test]
    fn malformed_files_are_errors_that_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.example", "server = 3\n");
        let e = endpoints(d.path(), "a.example", "a.example").unwrap_err();
        assert!(e.to_string().contains("a.example/hosts.toml"), "{e}");
        write(d.path(), "b.example", "[host.\"ftp://x\"]\n");
        let e = endpoints(d.path(), "b.example", "b.example").unwrap_err();
        assert!(e.to_string().contains("ftp://x"), "{e}");
        write(
            d.path(),
            "c.example",
            "[host.\"https://x\"]\ncapabilities = [\"fly\"]\n",
        );
        let e = endpoints(d.path(), "c.example", "c.example").unwrap_err();
        assert!(e.to_string().contains("fly"), "{e}");
    }
}
