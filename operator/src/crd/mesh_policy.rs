//! `MeshPolicy`: which identities may reach which ports of the selected pods, and how their
//! traffic is audited.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{SecretKeyRef, ServiceAccountRef};

/// The inbound policy of a set of pods. Ports not listed by any policy refuse every connection.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "medmesh.io",
    version = "v1alpha1",
    kind = "MeshPolicy",
    plural = "meshpolicies",
    singular = "meshpolicy",
    shortname = "mpol",
    category = "medmesh",
    namespaced,
    status = "MeshPolicyStatus",
    derive = "PartialEq",
    doc = "Inbound policy of the selected pods: per port, the protocol and the identities allowed; default deny.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    // A printer column shows only the first value of a list, so the ports come from a summary
    // the controller writes into the status.
    printcolumn(name = "Ports", type_ = "string", json_path = ".status.ports"),
    printcolumn(
        name = "Ready",
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
pub struct MeshPolicySpec {
    /// The pods of this namespace the policy applies to; an empty selector selects all.
    pub pod_selector: LabelSelector,
    /// Inbound ports and who may connect to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["port"])
    )]
    pub ports: Vec<PortRule>,
    /// `enforce` denies what is not allowed; `audit` allows it and counts it.
    #[serde(default)]
    pub mode: PolicyMode,
    /// Auditing of DICOM traffic to the selected pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<PolicyAudit>,
}

/// One inbound port.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    /// The application's container port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// How the sidecar reads the bytes; detected from the first bytes when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<PortProtocol>,
    /// Who may connect over mTLS; empty: nobody.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allow: Vec<Peer>,
}

/// The protocol hint of a port.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// DICOM upper layer (DIMSE); audited when the policy has `audit`.
    Dicom,
    /// HTTP (DICOMweb or other).
    Http,
    /// An opaque byte stream (no detection; for server-speaks-first protocols).
    Opaque,
}

/// An allowed peer: exactly one of a SPIFFE ID, a service account or a namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.spiffeId) ? 1 : 0) + (has(self.serviceAccount) ? 1 : 0) + (has(self.__namespace__) ? 1 : 0) == 1",
    "message": "exactly one of spiffeId, serviceAccount or namespace must be set",
}]))]
pub struct Peer {
    /// Exactly this SPIFFE ID (it must belong to the mesh trust domain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub spiffe_id: Option<String>,
    /// A service account; its namespace defaults to the policy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountRef>,
    /// Every workload of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// Whether denials are enforced.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// Deny what is not allowed.
    #[default]
    Enforce,
    /// Allow everything, count and log what would have been denied.
    Audit,
}

/// Auditing settings of the selected pods.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAudit {
    /// The `AuditLedger` (in this namespace) that receives the records.
    pub ledger_ref: LedgerRef,
    /// `enforce`: a DICOM response waits for the ledger; `spool`: for the local spool.
    #[serde(default)]
    pub delivery: AuditDelivery,
    /// The tenant key (at least 32 bytes) under which UIDs and AE titles are hashed.
    pub key_secret_ref: SecretKeyRef,
    /// Archiving: every instance recorded as stored is also sealed and archived into an
    /// `ImageArchive` of this namespace, linked to its record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<PolicyArchive>,
}

/// Archiving of the stored instances of the selected pods.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyArchive {
    /// The `ImageArchive` (in this namespace) that receives the sealed instances; its `adders`
    /// must name the selected pods' identities.
    pub archive_ref: ArchiveRef,
    /// `async`: stores never wait for the archive; `required`: a store whose instance cannot
    /// be staged durably fails.
    #[serde(default)]
    pub mode: ArchiveMode,
    /// An extra age recipient (`age1…`) every instance is also sealed to: a break-glass key
    /// the hospital keeps offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 59, max = 100),
        regex(pattern = r"^age1[02-9ac-hj-np-z]+$")
    )]
    pub break_glass_recipient: Option<String>,
    /// Who may read the namespace's archive identity (Secret `medmesh-archive-key`): RBAC
    /// subjects, bound to a Role that can get only that Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub restorers: Vec<k8s_openapi::api::rbac::v1::Subject>,
}

/// A reference to an `ImageArchive` in the same namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
pub struct ArchiveRef {
    /// Name of the `ImageArchive`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What a store waits for.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveMode {
    /// Stores never wait for the archive.
    #[default]
    Async,
    /// A store whose instance cannot be staged durably fails.
    Required,
}

/// A reference to an `AuditLedger` in the same namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
pub struct LedgerRef {
    /// Name of the `AuditLedger`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// When a DICOM response may be released.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuditDelivery {
    /// After the ledger acknowledged the record.
    Enforce,
    /// After the record is durable in the pod's spool.
    #[default]
    Spool,
}

/// What the operator made of a policy.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The ports, as `kubectl get` shows them: `104/dicom,8042/http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<String>,
}

impl MeshPolicySpec {
    /// `port[/protocol]` of every port, comma-separated, in the order given.
    pub fn ports_summary(&self) -> String {
        let mut out = String::new();
        for (i, p) in self.ports.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&p.port.to_string());
            let proto = match p.protocol {
                Some(PortProtocol::Dicom) => "/dicom",
                Some(PortProtocol::Http) => "/http",
                Some(PortProtocol::Opaque) => "/opaque",
                None => "",
            };
            out.push_str(proto);
        }
        out
    }
}
