//! `ImageArchive`: a private IPFS cluster (Kubo + ipfs-cluster) that keeps encrypted copies of
//! audited images, deployed by the operator as a StatefulSet.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::WorkloadIdentity;

/// Most replicas an archive may have (every peer trusts every other: keep the set small).
pub const MAX_ARCHIVE_REPLICAS: i32 = 15;

/// A private IPFS archive cluster.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "medmesh.io",
    version = "v1alpha1",
    kind = "ImageArchive",
    plural = "imagearchives",
    singular = "imagearchive",
    shortname = "archive",
    category = "medmesh",
    namespaced,
    status = "ImageArchiveStatus",
    derive = "PartialEq",
    doc = "A private IPFS archive cluster (Kubo + ipfs-cluster, CRDT consensus) for encrypted copies of audited images.",
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Peers", type_ = "integer", json_path = ".status.clusterPeers"),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.replication.min <= self.replicas",
        "message": "replication.min cannot exceed replicas: no pin could ever be placed",
    },
]))]
pub struct ImageArchiveSpec {
    /// Number of archive peers (each a Kubo node and an ipfs-cluster peer).
    #[serde(default = "three")]
    #[schemars(range(min = 1, max = 15))]
    pub replicas: i32,
    /// On how many peers each archived object is pinned.
    #[serde(default)]
    pub replication: Replication,
    /// Persistent storage of each peer.
    pub storage: ArchiveStorage,
    /// Compute resources of each peer's containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ArchiveResources>,
    /// Container images; the operator's defaults when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ArchiveImages>,
    /// Identities allowed to add to the archive and query pins (the cluster REST API, through
    /// the mesh). Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub adders: Vec<WorkloadIdentity>,
    /// Identities allowed to read archived objects (the Kubo gateway, through the mesh).
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub readers: Vec<WorkloadIdentity>,
}

fn three() -> i32 {
    3
}

/// The replication factor of every pin: at least `min` peers must pin it for an add to
/// succeed; the cluster places it on up to `max`, and re-places it when a peer is lost.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.min <= self.max",
    "message": "replication.min cannot exceed replication.max",
}]))]
pub struct Replication {
    /// Fewest peers a pin must reach.
    #[serde(default = "two")]
    #[schemars(range(min = 1, max = 15))]
    pub min: i32,
    /// Most peers a pin is placed on.
    #[serde(default = "three")]
    #[schemars(range(min = 1, max = 15))]
    pub max: i32,
}

fn two() -> i32 {
    2
}

impl Default for Replication {
    fn default() -> Self {
        Self { min: 2, max: 3 }
    }
}

/// Volumes of each peer: one for Kubo's blocks, one for ipfs-cluster's state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
    "message": "storageClassName is immutable",
}]))]
pub struct ArchiveStorage {
    /// Size of each peer's Kubo volume (the archived blocks), e.g. `500Gi`.
    pub kubo_size: Quantity,
    /// Size of each peer's ipfs-cluster volume (the pin set), e.g. `5Gi`.
    pub cluster_size: Quantity,
    /// Storage class of both volumes; the cluster default when omitted. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

/// Compute resources per container.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveResources {
    /// The Kubo container's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubo: Option<ResourceRequirements>,
    /// The ipfs-cluster container's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ResourceRequirements>,
}

/// Container images.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveImages {
    /// Kubo (`ipfs/kubo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub kubo: Option<String>,
    /// ipfs-cluster (`ipfs/ipfs-cluster`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub cluster: Option<String>,
}

/// What the operator observed of an archive.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageArchiveStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Pods that pass their readiness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Peers the cluster itself reports healthy (its `/peers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_peers: Option<i32>,
    /// The cluster REST API, through the mesh (for `adders`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The Kubo gateway, through the mesh (for `readers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The peers as the cluster sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["replica"]))]
    pub peers: Vec<ArchivePeer>,
}

/// One archive peer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchivePeer {
    /// Pod name (the cluster peer name).
    pub replica: String,
    /// Its ipfs-cluster peer ID (generated by the operator).
    pub peer_id: String,
    /// Its Kubo peer ID (generated by the operator).
    pub ipfs_peer_id: String,
    /// Whether the cluster lists it as a healthy member.
    pub seen: bool,
    /// What the cluster reports wrong with it, when anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
