//! `hyperbox-pull`: containerd's client-side pull.
//!
//! In containerd 1.7 (and for `ctr`/nerdctl in 2.x) pulling is the
//! client's job: it resolves the image, writes its blobs into containerd's
//! content store under a lease, unpacks layer by layer with
//! `Snapshots.Prepare`, `Diff.Apply` and `Snapshots.Commit`, and records the
//! image. With [`Options::remote_labels`], each Prepare carries the labels
//! CRI and nerdctl send ([`hyperbox_api::labels`]), and a snapshotter that
//! answers `AlreadyExists` (a remote snapshotter that fetched the layer
//! itself) makes the client skip that layer's download and unpack.
//!
//! - [`Session`]: a containerd connection in one namespace, and the content,
//!   lease, image and snapshot calls a pull makes.
//! - [`pull`]: the whole sequence for an image already resolved (a
//!   [`hyperbox_registry::Resolved`]), with layer blobs obtained through a
//!   [`LayerSource`] only when a layer must be unpacked here.
//!
//! `hb image pull` resolves with hyperbox-registry; the test harness
//! resolves with its own independent registry client and shares only this
//! sequence.

#![deny(missing_docs)]

mod pull;
mod session;

pub use pull::{Blob, LayerOutcome, LayerReport, LayerSource, Options, PullReport, pull};
pub use session::Session;

use tonic::Code;

/// Errors of a pull.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// containerd answered a call with an error.
    #[error("containerd {call} ({what}): {code:?}: {message}")]
    Rpc {
        /// The RPC.
        call: &'static str,
        /// Its subject (digest, snapshot key, image name).
        what: String,
        /// The gRPC code.
        code: Code,
        /// containerd's message.
        message: String,
    },
    /// The snapshotter refused a layer's Prepare.
    #[error("layer {index} ({digest}): the snapshotter refused it: {message}")]
    Refused {
        /// The layer's position, bottom first.
        index: usize,
        /// Its compressed digest.
        digest: String,
        /// The snapshotter's message.
        message: String,
    },
    /// A layer blob could not be obtained from its [`LayerSource`].
    #[error(transparent)]
    Fetch(Box<dyn std::error::Error + Send + Sync>),
    /// containerd unpacked a layer into other content than its config
    /// promised.
    #[error(
        "layer {digest}: unpacked layer digest {applied} differs from config diff_id {diff_id}"
    )]
    DiffIdMismatch {
        /// The layer's compressed digest.
        digest: String,
        /// What containerd's Diff service computed.
        applied: String,
        /// What the image config says.
        diff_id: String,
    },
    /// The resolved image is inconsistent.
    #[error("image {reference}: {detail}")]
    Image {
        /// The image.
        reference: String,
        /// What is wrong.
        detail: String,
    },
    /// Reading a layer blob from a local file failed.
    #[error("read {}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The gRPC code when containerd answered with an error.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The module-wide result.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn rpc(
    call: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(tonic::Status) -> Error {
    let what = what.into();
    move |s| Error::Rpc {
        call,
        what,
        code: s.code(),
        message: s.message().to_string(),
    }
}
