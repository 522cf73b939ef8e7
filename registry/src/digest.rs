//! Content digests (`sha256:<64 hex>`) and incremental verification.

use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// A parsed `sha256:` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`; other algorithms are refused
    /// rather than served unverified.
    pub fn parse(s: &str) -> Result<Digest, Error> {
        let bad = |why: &str| Error::Digest {
            digest: s.into(),
            why: why.into(),
        };
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| bad("only sha256 digests are supported"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad("expected 64 lowercase hex digits after sha256:"));
        }
        Ok(Digest { hex: hex.into() })
    }

    /// The hex part, safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest {
            hex: hex::encode(Sha256::digest(bytes)),
        }
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// The chain id of a layer with `diff_id` stacked on the snapshot whose
/// chain id is `parent` (empty for the bottom layer), as containerd names
/// layer snapshots (OCI image spec: `ChainID(L0) = DiffID(L0)`,
/// `ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln))`).
pub fn chain_id(parent: &str, diff_id: &str) -> String {
    if parent.is_empty() {
        diff_id.to_string()
    } else {
        Digest::of(format!("{parent} {diff_id}").as_bytes()).to_string()
    }
}

/// The chain ids of a stack of layers, bottom first, from their diff ids.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = chain_id(out.last().map_or("", String::as_str), d);
        out.push(next);
    }
    out
}

/// Hashes bytes as they stream by.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    hasher: Sha256,
    len: u64,
}

impl Verifier {
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was seen.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks the bytes seen against `expected`.
    pub fn finish(self, expected: &Digest, what: &str) -> Result<(), Error> {
        let actual = hex::encode(self.hasher.finalize());
        if actual != expected.hex {
            return Err(Error::DigestMismatch {
                what: what.into(),
                expected: expected.to_string(),
                actual: format!("sha256:{actual}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], Digest::of(format!("{a} {b}").as_bytes()).to_string());
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn parse_accepts_only_well_formed_sha256() {
        let d = Digest::of(b"abc");
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        for bad in [
            "sha512:00",
            "sha256:xyz",
            "sha256:../../etc/passwd",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn verifier_detects_changed_content() {
        let d = Digest::of(b"hello world");
        let mut v = Verifier::default();
        v.update(b"hello ");
        v.update(b"world");
        assert_eq!(v.len(), 11);
        v.finish(&d, "x").unwrap();
        let mut v = Verifier::default();
        v.update(b"hello w0rld");
        let e = v.finish(&d, "blob").unwrap_err().to_string();
        assert!(e.contains("blob") && e.contains(&d.to_string()), "{e}");
    }
}
