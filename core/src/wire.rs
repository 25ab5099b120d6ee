//! JSON bodies of the ledger API, shared by the server and its clients.

use serde::{Deserialize, Serialize};

use crate::merkle::Hash;
use crate::record::{AuditRecord, LogEntry};

/// How long the ledger's API waits for a request's headers, which for HTTP/1.1 also bounds how
/// long a keep-alive connection may sit idle between requests (hyper arms the same timer for
/// both): the ledger closes it then.
pub const API_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a ledger client keeps an idle connection for reuse: well inside
/// [`API_HEADER_TIMEOUT`], so that no request is written into a connection the ledger is
/// closing at that moment (such a request fails with no answer).
pub const CLIENT_POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(4);

/// Body of `POST /v1/entries/batch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Records to append, in order.
    pub records: Vec<AuditRecord>,
}

/// One appended entry, as answered.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct AppendResult {
    /// Index in the log.
    pub index: u64,
    /// Leaf hash of the stored entry.
    pub leaf_hash: Hash,
    /// The ledger's receive time stored in the entry: with it, the submitter rebuilds the entry
    /// (time, its own SPIFFE ID, its record) and checks `leaf_hash` itself.
    pub received_us: u64,
    /// Whether the record id was already present with the same content.
    pub duplicate: bool,
    /// Whether the record id is already used by entry `index` for a different record or
    /// submitter: this record was NOT stored (`index` and `leaf_hash` are the other entry's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conflict: bool,
    /// Inclusion proof against the returned checkpoint, when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inclusion_proof: Option<Vec<Hash>>,
}

/// Answer to `POST /v1/entries`.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct AppendResponse {
    /// The entry.
    #[serde(flatten)]
    pub result: AppendResult,
    /// Signed checkpoint the proof is against, when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// Answer to `POST /v1/entries/batch`.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct BatchResponse {
    /// One result per record, in order.
    pub results: Vec<AppendResult>,
    /// Signed checkpoint the proofs are against, when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// One entry as served.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct EntryView {
    /// Index.
    pub index: u64,
    /// The leaf hash the tree holds for this index (what proofs are built from). Clients
    /// recompute the hash of `entry` and compare: a mismatch means the entry or the tree was
    /// altered.
    pub leaf_hash: Hash,
    /// The canonical entry bytes, base64.
    pub entry: String,
    /// The decoded entry, or null if the stored bytes do not decode.
    pub decoded: Option<LogEntry>,
    /// Why the stored bytes do not decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_error: Option<String>,
    /// Inclusion proof (search hits only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inclusion_proof: Option<Vec<Hash>>,
}

/// Answer to `GET /v1/entries?start=&end=`.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct RangeResponse {
    /// Log size when read.
    pub tree_size: u64,
    /// The entries.
    pub entries: Vec<EntryView>,
}

/// An inclusion proof as served.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct InclusionView {
    /// Leaf index.
    pub index: u64,
    /// Tree size the proof is for.
    pub tree_size: u64,
    /// The stored leaf hash.
    pub leaf_hash: Hash,
    /// Sibling hashes, bottom-up.
    pub proof: Vec<Hash>,
}

/// A consistency proof as served.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct ConsistencyView {
    /// Older size.
    pub from: u64,
    /// Newer size.
    pub to: u64,
    /// Proof hashes.
    pub proof: Vec<Hash>,
}

/// Answer to `GET /v1/search`.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct SearchResponse {
    /// Size of the checkpoint the proofs are against.
    pub tree_size: u64,
    /// How many of those entries the search indexes covered (equal to `tree_size` unless the
    /// indexer is behind under heavy load; entries beyond it are not searched).
    #[serde(default)]
    pub indexed_size: u64,
    /// That checkpoint, signed.
    pub checkpoint: String,
    /// Matching entries, each with its inclusion proof.
    pub hits: Vec<EntryView>,
    /// Whether more entries matched than were returned.
    pub truncated: bool,
}

/// Error body of every refusal.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct ErrorBody {
    /// Precise message.
    pub error: String,
    /// Bounded reason label.
    pub reason: String,
}

/// Body of the operator's `POST /v1/certificate` (identity service): a PKCS#10 CSR whose only
/// SAN is the workload's SPIFFE ID, and the workload's projected service-account token
/// (audience `medmesh-identity`) proving which service account it runs as.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificateRequest {
    /// The CSR (PEM).
    pub csr: String,
    /// The projected service-account token.
    pub token: String,
}

impl std::fmt::Debug for CertificateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never in logs.
        f.debug_struct("CertificateRequest")
            .field("csr", &self.csr)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Answer of `POST /v1/certificate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// The X.509-SVID chain (PEM), leaf first.
    pub certificate: String,
    /// The trust bundle of the trust domain (PEM).
    pub bundle: String,
    /// End of the leaf's validity (RFC 3339, UTC).
    pub not_after: String,
}

/// The audit settings a sidecar reads from a file (`MEDMESH_AUDIT_CONFIG`), written by the
/// operator from a namespace's MeshPolicies into the policy ConfigMap (`audit.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SidecarAudit {
    /// The ledger's client endpoint (`https://…`).
    pub ledger_url: String,
    /// The ledger's server SPIFFE ID, pinned when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_id: Option<String>,
    /// The ledger's checkpoint verifier key (Go `sumdb/note` format).
    pub ledger_verifier: String,
    /// The log origin.
    pub ledger_origin: String,
    /// `enforce` or `spool`.
    pub delivery: String,
    /// File holding the keyed-hash (HMAC) key.
    pub key_file: String,
    /// Archiving of stored instances, when the namespace's policy names an archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<SidecarArchive>,
}

/// Where and how a sidecar archives stored instances (part of [`SidecarAudit`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SidecarArchive {
    /// The archive cluster's REST API (`http://<archive>.<namespace>.svc:9094`), reached
    /// through the mesh.
    pub url: String,
    /// The archive's SPIFFE ID.
    pub id: String,
    /// The age recipients instances are sealed to: the namespace's archive key, then the
    /// break-glass key if any.
    pub recipients: Vec<String>,
    /// `async` or `required`.
    pub mode: String,
    /// Least number of peers that must pin an instance.
    pub replication_min: u32,
    /// Most peers that pin an instance.
    pub replication_max: u32,
}

/// `GET /v1/status` (and the admin `/status`): one ledger replica's view of the ledger and,
/// when it is replicated, of its Raft cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LedgerStatus {
    /// Whether this ledger is one of several Raft replicas.
    pub replicated: bool,
    /// This replica's Raft id (its StatefulSet ordinal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Its Raft role: `Leader`, `Follower`, `Candidate` or `Learner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The leader it knows, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    /// The current Raft term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    /// Index of the last entry in its Raft log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_log_index: Option<u64>,
    /// Index of the last Raft entry applied to its ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_index: Option<u64>,
    /// Index of the last Raft entry its snapshot covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_index: Option<u64>,
    /// The cluster's members as this replica knows them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// On the leader: how far each follower has replicated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub followers: Vec<FollowerStatus>,
    /// Whether it serves (what `/ready` answers).
    pub ready: bool,
    /// Why it does not, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
    /// Entries in its tree.
    pub tree_size: u64,
    /// Size of the checkpoint it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_size: Option<u64>,
}

/// A member of a replicated ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Raft id.
    pub id: u64,
    /// Address (`host:port`).
    pub addr: String,
    /// Whether it votes (a learner does not).
    pub voter: bool,
}

/// Replication progress of one follower, as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowerStatus {
    /// Raft id.
    pub id: u64,
    /// Last Raft index known replicated to it.
    pub matched: u64,
    /// Raft entries it has yet to receive.
    pub lag: u64,
}
