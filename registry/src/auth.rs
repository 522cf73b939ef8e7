//! Credentials and challenges: docker's `config.json` (`auths`, as
//! `docker login` and `nerdctl login` write it) and the registry's
//! `WWW-Authenticate` header (RFC 7235), Basic or Bearer with the token
//! service's `realm`, `service` and `scope`.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use crate::error::Error;

/// A user name and password (or a token used as password).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets, not even in debug logs.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// The credentials of a docker config file.
#[derive(Debug, Default, Clone)]
pub struct DockerConfig {
    by_host: BTreeMap<String, Credentials>,
}

/// `https://index.docker.io/v1/` → `index.docker.io`; docker.io's aliases
/// all become `docker.io`.
fn normalize_host(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or_default();
    match k {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => k.to_string(),
    }
}

impl DockerConfig {
    /// Loads `path`; a missing file means no credentials.
    pub fn load(path: &Path) -> Result<DockerConfig, Error> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerConfig::default());
            }
            Err(source) => {
                return Err(Error::Io {
                    action: "read",
                    path: path.into(),
                    source,
                });
            }
        };
        Self::parse(&text, path)
    }

    /// Parses config.json text; `path` only labels errors.
    pub fn parse(text: &[u8], path: &Path) -> Result<DockerConfig, Error> {
        let bad = |why: String| Error::Config {
            path: path.into(),
            why,
        };
        let f: ConfigFile = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
        let mut by_host = BTreeMap::new();
        for (key, e) in f.auths {
            let creds = if let Some(token) = e.identitytoken.filter(|t| !t.is_empty()) {
                // An identity token is a refresh token; registries that
                // issue them accept it as the password of a token request
                // with the placeholder user docker uses.
                Credentials {
                    username: "<token>".into(),
                    password: token,
                }
            } else if let Some(a) = e.auth.filter(|a| !a.is_empty()) {
                let raw = STANDARD
                    .decode(a.trim())
                    .map_err(|err| bad(format!("auths.{key:?}.auth: not base64: {err}")))?;
                let s = String::from_utf8(raw)
                    .map_err(|_| bad(format!("auths.{key:?}.auth: not UTF-8")))?;
                let (u, p) = s
                    .split_once(':')
                    .ok_or_else(|| bad(format!("auths.{key:?}.auth: expected user:password")))?;
                Credentials {
                    username: u.into(),
                    password: p.into(),
                }
            } else if let (Some(u), Some(p)) = (e.username, e.password) {
                Credentials {
                    username: u,
                    password: p,
                }
            } else {
                continue;
            };
            by_host.insert(normalize_host(&key), creds);
        }
        Ok(DockerConfig { by_host })
    }

    /// Credentials for `host` (`host[:port]`; docker.io aliases match).
    pub fn get(&self, host: &str) -> Option<&Credentials> {
        self.by_host.get(&normalize_host(host))
    }
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP Basic.
    Basic,
    /// A token service.
    Bearer {
        /// Token endpoint.
        realm: String,
        /// `service` parameter.
        service: Option<String>,
        /// `scope` parameter the registry asked for.
        scope: Option<String>,
    },
}

/// Parses `WWW-Authenticate`; unknown schemes are skipped.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out = Vec::new();
    let mut rest = header.trim();
    while !rest.is_empty() {
        let (scheme, after) = match rest.find(|c: char| c.is_whitespace() || c == ',') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let mut params = BTreeMap::new();
        let mut p = after.trim_start_matches([',', ' ', '\t']);
        // key=value or key="quoted, value" pairs until the next scheme.
        while let Some(eq) = p.find('=') {
            let key = p[..eq].trim();
            if key.is_empty() || key.contains(char::is_whitespace) {
                break;
            }
            let v = &p[eq + 1..];
            let (value, next) = if let Some(q) = v.strip_prefix('"') {
                let mut val = String::new();
                let mut chars = q.char_indices();
                let mut end = q.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                val.push(n);
                            }
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => val.push(c),
                    }
                }
                (val, &q[end.min(q.len())..])
            } else {
                let e = v.find(',').unwrap_or(v.len());
                (v[..e].trim().to_string(), &v[e..])
            };
            params.insert(key.to_ascii_lowercase(), value);
            p = next.trim_start_matches([',', ' ', '\t']);
        }
        rest = p;
        if scheme.eq_ignore_ascii_case("basic") {
            out.push(Challenge::Basic);
        } else if scheme.eq_ignore_ascii_case("bearer")
            && let Some(realm) = params.remove("realm")
        {
            out.push(Challenge::Bearer {
                realm,
                service: params.remove("service"),
                scope: params.remove("scope"),
            });
        }
        if scheme.is_empty() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_reads_auth_user_password_and_aliases() {
        let text = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},
            "127.0.0.1:5000":{"username":"u","password":"p"},
            "ghcr.io":{"identitytoken":"tok"},
            "empty.example":{}
        }}"#;
        let c = DockerConfig::parse(text, Path::new("/x")).unwrap();
        let d = c.get("registry-1.docker.io").unwrap();
        assert_eq!(
            (d.username.as_str(), d.password.as_str()),
            ("user", "pa:ss")
        );
        assert_eq!(c.get("docker.io"), c.get("index.docker.io"));
        assert_eq!(c.get("127.0.0.1:5000").unwrap().password, "p");
        assert_eq!(c.get("ghcr.io").unwrap().password, "tok");
        assert!(c.get("empty.example").is_none());
        assert!(!format!("{d:?}").contains("pa:ss"));
    }

    #[test]
    fn docker_config_errors_name_the_entry() {
        let e = DockerConfig::parse(br#"{"auths":{"h":{"auth":"%%%"}}}"#, Path::new("/c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/c.json") && e.contains("\"h\""), "{e}");
        assert!(DockerConfig::parse(b"{", Path::new("/c.json")).is_err());
    }

    #[test]
    fn challenges_parse_like_registries_send_them() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(
            c,
            [Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull".into()),
            }]
        );
        assert_eq!(
            parse_challenges(r#"Basic realm="Registry Realm""#),
            [Challenge::Basic]
        );
        assert_eq!(
            parse_challenges(r#"Negotiate, Basic realm="a, b""#),
            [Challenge::Basic]
        );
        assert!(parse_challenges("Bearer service=x").is_empty());
    }
}
