//! The registry client's errors, and which of them are worth a retry.

use std::path::PathBuf;

/// Errors of talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference is malformed.
    #[error("invalid image reference {reference:?}: {why}")]
    Reference {
        /// What was given.
        reference: String,
        /// What is wrong.
        why: String,
    },
    /// A hosts.toml or docker config file is unreadable or malformed.
    #[error("{path}: {why}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The registry refused our credentials, or wants some we do not have.
    #[error("{url}: unauthorized: {why}")]
    Unauthorized {
        /// The request.
        url: String,
        /// What the registry or token service said.
        why: String,
    },
    /// No endpoint has the object.
    #[error("{url}: not found")]
    NotFound {
        /// The last URL tried.
        url: String,
    },
    /// The registry answered with an unexpected status.
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        /// The request.
        url: String,
        /// The status code.
        status: u16,
        /// The start of the reply body (registries explain errors there).
        body: String,
    },
    /// The connection failed or broke (including TLS verification).
    #[error("{url}: {detail}")]
    Transport {
        /// The request.
        url: String,
        /// The whole error chain (reqwest hides the useful part in sources).
        detail: String,
    },
    /// Downloaded bytes do not hash to the digest they were asked for.
    #[error("{what}: content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which object.
        what: String,
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// The digest is malformed or uses an algorithm we cannot verify.
    #[error("unsupported digest {digest:?}: {why}")]
    Digest {
        /// The digest.
        digest: String,
        /// What is wrong.
        why: String,
    },
    /// The manifest or index is not something we can pull.
    #[error("{reference}: {why}")]
    Manifest {
        /// The image.
        reference: String,
        /// What is wrong.
        why: String,
    },
    /// A reply body went past its bound: the length the registry announced
    /// (Content-Length, Content-Range) or the most such an object may hold.
    /// The rest of the body is never read.
    #[error("{url}: {what} longer than {limit} bytes; stopped reading")]
    TooLarge {
        /// The request.
        url: String,
        /// Which body (`manifest`, `error body`, `token reply`, `range reply`).
        what: &'static str,
        /// The bound it went past.
        limit: u64,
    },
    /// A blob reply went past the size the blob may have: the size its
    /// descriptor gives, or without one a cap. Announced (Content-Length,
    /// Content-Range) or streamed (chunked), the bytes past it are never
    /// read or written.
    #[error("{url}: blob longer than {limit} bytes, {why}; stopped reading")]
    BlobTooLong {
        /// The request.
        url: String,
        /// The most bytes the blob may have.
        limit: u64,
        /// Where that bound comes from.
        why: &'static str,
    },
    /// The registry redirected in a way we do not follow.
    #[error("{url}: redirect refused: {why}")]
    Redirect {
        /// The request that was redirected.
        url: String,
        /// What is wrong (no Location, too many hops, another scheme).
        why: String,
    },
    /// Every endpoint of a host failed; each one's error, in order tried.
    #[error("every endpoint failed: {}", .errors.join("; "))]
    AllEndpoints {
        /// `base: error` per endpoint.
        errors: Vec<String>,
    },
    /// The caller no longer wanted a paced download ([`crate::Pace`]);
    /// what it had read is removed.
    #[error("{url}: download stopped after {read} bytes: no longer wanted")]
    Stopped {
        /// The request.
        url: String,
        /// Bytes read before it stopped.
        read: u64,
    },
    /// A local file operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the same request may succeed if tried again: connection
    /// failures, resets, timeouts, 5xx and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }

    /// Whether the failure is about reaching the registry rather than about
    /// the content: the caller may let someone with other credentials or
    /// another network path (containerd itself) try instead.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Error::Transport { .. }
                | Error::Status { .. }
                | Error::Unauthorized { .. }
                | Error::NotFound { .. }
                | Error::AllEndpoints { .. }
                | Error::Redirect { .. }
        )
    }
}
