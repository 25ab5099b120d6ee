//! `AuditLedger`: a replicated medmesh ledger the operator deploys as a StatefulSet.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{SecretKeyRef, WorkloadIdentity};

/// An audit ledger: a replicated, tamper-evident log of audit records.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "medmesh.io",
    version = "v1alpha1",
    kind = "AuditLedger",
    plural = "auditledgers",
    singular = "auditledger",
    shortname = "ledger",
    category = "medmesh",
    namespaced,
    status = "AuditLedgerStatus",
    derive = "PartialEq",
    doc = "An audit ledger: a replicated, tamper-evident log of the audit records of medmesh sidecars.",
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Tree size",
        type_ = "integer",
        json_path = ".status.checkpoint.treeSize"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AuditLedgerSpec {
    /// Number of ledger replicas: 1, 3 or 5 (a majority must be up to append).
    #[serde(default = "one")]
    #[schemars(extend("enum" = [1, 3, 5]))]
    pub replicas: i32,
    /// Persistent storage of each replica.
    pub storage: Storage,
    /// The key that signs checkpoints. Immutable: a new key would start a new log.
    pub signing_key: SigningKey,
    /// Identities allowed to append records (usually the sidecars of audited workloads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub appenders: Vec<WorkloadIdentity>,
    /// Identities allowed to read entries, proofs and search (auditors).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub readers: Vec<WorkloadIdentity>,
    /// Compute resources of each ledger container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Ledger image; the operator's `--ledger-image` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
}

fn one() -> i32 {
    1
}

/// Storage of each replica (a PersistentVolumeClaim per replica).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
    "message": "storageClassName is immutable",
}]))]
pub struct Storage {
    /// Size of each replica's volume, e.g. `10Gi`.
    pub size: Quantity,
    /// Storage class of the volumes; the cluster default when omitted. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

/// Where the checkpoint signing key comes from: exactly one of `generate` or `secretRef`.
/// Immutable. (Both rules sit on the type: a field-level `extend` of the same key would replace
/// the type's rules instead of adding to them.)
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.generate) != has(self.secretRef)",
        "message": "exactly one of generate or secretRef must be set",
    },
    {
        "rule": "self == oldSelf",
        "message": "signingKey is immutable: a new key starts a new log",
    },
]))]
pub struct SigningKey {
    /// Generate a key once into a Secret; it is never regenerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<GenerateKey>,
    /// Use the signing key stored in an existing Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// Generate the signing key into a Secret.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenerateKey {
    /// Name of the Secret to create; `<ledger name>-signing-key` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
}

/// What the operator observed of a ledger.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditLedgerStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Replicas that pass their readiness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// The URL sidecars and auditors use, e.g. `https://ledger.audit.svc:8443`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The latest checkpoint read from the ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointStatus>,
    /// With several replicas: their Raft cluster, as the replica the operator reached sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationStatus>,
}

/// The Raft cluster of a replicated ledger.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationStatus {
    /// The leader's pod name, when one is elected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The current Raft term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub term: Option<i64>,
    /// Index of the last Raft entry applied by the replica that answered (on the leader: the
    /// commit index as far as it has applied it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub applied_index: Option<i64>,
    /// The replica that answered (pod name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_from: Option<String>,
    /// When the leader answered: each follower's replication lag, in Raft entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["replica"]))]
    pub followers: Vec<FollowerLag>,
}

/// How far one follower is behind its leader.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FollowerLag {
    /// The follower's pod name.
    pub replica: String,
    /// Raft entries it has yet to receive.
    #[schemars(range(min = 0))]
    pub lag: i64,
}

/// A signed checkpoint of the ledger, as last read by the operator.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    /// Number of entries the checkpoint covers.
    #[schemars(range(min = 0))]
    pub tree_size: i64,
    /// Merkle root hash (base64, as in the signed note).
    pub root_hash: String,
    /// When the operator read it.
    pub time: Time,
}
