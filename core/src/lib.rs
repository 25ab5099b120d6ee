//! Domain types shared by every medmesh component, with no Kubernetes or HTTP dependency:
//! SPIFFE identities, the audit record and its canonical encoding, RFC 9162 Merkle proofs,
//! signed checkpoints, and the TLS/SVID rules of the mesh.
//!
//! Auditors and the CLI verify ledger proofs with this crate alone.

pub mod base16;
pub mod checkpoint;
#[cfg(feature = "devca")]
pub mod devca;
#[cfg(feature = "devca")]
pub mod devnet;
pub mod dicom;
pub mod merkle;
pub mod p2p;
pub mod policy;
pub mod record;
pub mod seal;
pub mod spiffe;
pub mod tls;
pub mod unixfs;
pub mod wire;

pub use checkpoint::{Checkpoint, NoteError, NoteSigner, NoteVerifier};
pub use merkle::Hash;
pub use record::{AuditRecord, LogEntry};
pub use spiffe::{SpiffeId, TrustDomain};
