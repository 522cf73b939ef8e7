//! A token service for registry bearer auth, as Docker Hub and most
//! registries run one: the registry (Debian's docker-registry with
//! `auth.token`) answers 401 with a `Bearer realm=…` challenge, the client
//! asks this service for a token for the scope, and the registry checks the
//! token's signature against the certificate it was configured with.
//!
//! Tokens are ES256 JWTs carrying the certificate in `x5c`, as
//! docker/distribution expects. Basic credentials are checked when the
//! service was started with some; anonymous requests are then refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The `service` the registry and the tokens name.
pub const SERVICE: &str = "hyperbox-test-registry";
/// The token issuer the registry trusts.
pub const ISSUER: &str = "hyperbox-test-token-service";

/// A running token service; stops on drop.
#[derive(Debug)]
pub struct TokenService {
    addr: SocketAddr,
    cert: PathBuf,
    task: JoinHandle<()>,
}

struct Keys {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    basic: Option<String>,
}

fn openssl(dir: &Path, args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

impl TokenService {
    /// Starts the service with a fresh signing key in `dir`; with `creds`
    /// (`user`, `password`) only that user gets tokens.
    pub async fn start(dir: &Path, creds: Option<(&str, &str)>) -> std::io::Result<TokenService> {
        openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "token.key",
            ],
        )?;
        openssl(
            dir,
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "token.key",
                "-outform",
                "DER",
                "-out",
                "token.pk8",
            ],
        )?;
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "token.key",
                "-out",
                "token.pem",
                "-days",
                "2",
                "-subj",
                "/CN=hyperbox test token signer",
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-in",
                "token.pem",
                "-outform",
                "DER",
                "-out",
                "token.der",
            ],
        )?;
        let pk8 = std::fs::read(dir.join("token.pk8"))?;
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pk8, &SystemRandom::new())
                .map_err(|e| std::io::Error::other(format!("signing key: {e}")))?;
        let keys = Arc::new(Keys {
            key,
            cert_der: std::fs::read(dir.join("token.der"))?,
            basic: creds.map(|(u, p)| STANDARD.encode(format!("{u}:{p}"))),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let keys = keys.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    let reply = answer(&keys, &buf);
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        Ok(TokenService {
            addr,
            cert: dir.join("token.pem"),
            task,
        })
    }

    /// The realm URL for the registry's challenge.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The certificate the registry must trust (`rootcertbundle`).
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// The registry's `auth:` section for this service.
    pub fn registry_yaml(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm(),
            self.cert.display()
        )
    }
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(keys: &Keys, request: &[u8]) -> String {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(request).is_err() {
        return status(400, "bad request");
    }
    let path = req.path.unwrap_or("/");
    let auth = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("authorization"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .map(str::to_string);
    let user = match (&keys.basic, &auth) {
        (None, _) => "anonymous".to_string(),
        (Some(want), Some(got)) if want == got => "puller".to_string(),
        _ => return status(401, "{\"details\":\"bad or missing credentials\"}"),
    };
    let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut access = Vec::new();
    for kv in query.split('&') {
        if let Some(scope) = kv.strip_prefix("scope=") {
            let scope = scope
                .replace("%3A", ":")
                .replace("%2F", "/")
                .replace("%2C", ",");
            let parts: Vec<&str> = scope.splitn(3, ':').collect();
            if parts.len() == 3 {
                access.push(serde_json::json!({
                    "type": parts[0],
                    "name": parts[1],
                    "actions": parts[2].split(',').collect::<Vec<_>>(),
                }));
            }
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "ES256",
        "x5c": [STANDARD.encode(&keys.cert_der)],
    });
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": user,
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{:016x}", rand::random::<u64>()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = match keys
        .key
        .sign(&SystemRandom::new(), signing_input.as_bytes())
    {
        Ok(s) => s,
        Err(_) => return status(500, "signing failed"),
    };
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
    status(
        200,
        &serde_json::json!({"token": token, "expires_in": 300}).to_string(),
    )
}

fn status(code: u16, body: &str) -> String {
    format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
