//! medmesh-archive: the client half of medmesh's image archive (an `ImageArchive`: Kubo and
//! ipfs-cluster), used by the sidecar to archive and by the CLI to recover.
//!
//! - [`mesh`]: HTTP/1.1 to a workload through its sidecar: TLS 1.3 with this workload's SVID, the
//!   mesh ALPN, and the server pinned by SPIFFE ID (the archive's daemons listen on loopback;
//!   only their sidecar is reachable).
//! - [`cluster`]: ipfs-cluster's REST API: add a file (CIDv1, raw leaves, 256 KiB chunks, so
//!   the CID is the one `medmesh_core::unixfs` computes), read a pin's status on every peer.
//! - [`store`]: a local object store, keyed by the same CIDs, for the demo and tests.
//! - [`fetch`]: an object by CID from a Kubo gateway or a store, written to a file while its CID
//!   is recomputed from the bytes received: no gateway is trusted.
//!
//! Nothing identifying is ever sent: objects are ciphertexts (`medmesh_core::seal`), pin names
//! are opaque, no metadata is attached.

pub mod cluster;
pub mod fetch;
pub mod mesh;
pub mod store;

pub use cluster::{AddOptions, ClusterClient, PinStatus};
pub use fetch::{Source, fetch_verified};
pub use mesh::{MeshEndpoint, MeshTls};
pub use store::LocalStore;

/// Why an archive operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// A URL is not `http://host:port`.
    #[error("archive URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// Connecting, the TLS handshake or the HTTP exchange failed.
    #[error("{target}: {reason}")]
    Transport {
        /// host:port and path.
        target: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{target}: HTTP {status}: {body}")]
    Status {
        /// host:port and path.
        target: String,
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The server's answer is not what its API documents.
    #[error("{target}: unexpected answer: {reason}")]
    Malformed {
        /// host:port and path.
        target: String,
        /// Why.
        reason: String,
    },
    /// The bytes received do not hash to the CID asked for.
    #[error(
        "the bytes received for {expected} hash to {got}: refused (a gateway or store returned other content)"
    )]
    CidMismatch {
        /// The CID asked for.
        expected: String,
        /// The CID of what was received.
        got: String,
    },
    /// The object is not in the store.
    #[error("{cid} is not in the store at {dir}")]
    NotFound {
        /// The CID.
        cid: String,
        /// The store.
        dir: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

impl ArchiveError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
