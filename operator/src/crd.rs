//! The custom resources of medmesh (group `medmesh.io`, version `v1alpha1`) and the generation
//! of their `CustomResourceDefinition`s.
//!
//! The Rust types are the source of truth; `medmesh-operator crds` prints what [`all`] returns
//! and the files under `crds/` are checked against it by a test. Every schema is structural:
//! alternatives are structs of optional fields with a CEL "exactly one" rule, never untagged or
//! internally tagged enums (which schemars turns into `anyOf`/`oneOf` an API server refuses).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod audit_ledger;
mod image_archive;
mod mesh_policy;
#[cfg(test)]
mod tests;

pub use audit_ledger::{
    AuditLedger, AuditLedgerSpec, AuditLedgerStatus, CheckpointStatus, FollowerLag, GenerateKey,
    ReplicationStatus, SigningKey, Storage,
};
pub use image_archive::{
    ArchiveImages, ArchivePeer, ArchiveResources, ArchiveStorage, ImageArchive, ImageArchiveSpec,
    ImageArchiveStatus, MAX_ARCHIVE_REPLICAS, Replication,
};
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
pub use mesh_policy::{
    ArchiveMode, ArchiveRef, AuditDelivery, LedgerRef, MeshPolicy, MeshPolicySpec,
    MeshPolicyStatus, Peer, PolicyArchive, PolicyAudit, PolicyMode, PortProtocol, PortRule,
};

/// The API group of every medmesh resource.
pub const GROUP: &str = "medmesh.io";

/// Condition types shared by every medmesh resource (KEP-1623 shape).
pub mod condition {
    /// The resource has been acted on completely and is usable.
    pub const READY: &str = "Ready";
    /// The operator is working towards the desired state.
    pub const PROGRESSING: &str = "Progressing";
    /// Something is wrong that the user can see and usually fix (the message says what).
    pub const DEGRADED: &str = "Degraded";

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    /// A condition with status `True` or `False`.
    pub fn new(
        type_: &str,
        status: bool,
        reason: &str,
        message: &str,
        observed_generation: Option<i64>,
        now: &Time,
    ) -> Condition {
        Condition {
            type_: type_.to_owned(),
            status: if status { "True" } else { "False" }.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation,
            last_transition_time: now.clone(),
        }
    }

    /// Puts `new` into `conditions`, replacing the condition of the same type; when its status
    /// is unchanged the old `lastTransitionTime` is kept (KEP-1623).
    pub fn set(conditions: &mut Vec<Condition>, mut new: Condition) {
        match conditions.iter_mut().find(|c| c.type_ == new.type_) {
            Some(old) => {
                if old.status == new.status {
                    new.last_transition_time = old.last_transition_time.clone();
                }
                *old = new;
            }
            None => conditions.push(new),
        }
    }
}

/// A Kubernetes service account. The namespace defaults to the namespace of the resource that
/// names it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Namespace of the service account; the resource's own namespace when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the service account.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key of a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A workload identity: exactly one of a SPIFFE ID or a service account (whose SPIFFE ID is
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.spiffeId) != has(self.serviceAccount)",
    "message": "exactly one of spiffeId or serviceAccount must be set",
}]))]
pub struct WorkloadIdentity {
    /// A SPIFFE ID such as `spiffe://cluster.local/ns/radiology/sa/modality`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)*$"))]
    pub spiffe_id: Option<String>,
    /// A service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountRef>,
}

/// Every CRD of medmesh, in a stable order (the order of the files in `crds/`).
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        finish(AuditLedger::crd()),
        finish(MeshPolicy::crd()),
        finish(ImageArchive::crd()),
    ]
}

/// The CRDs as one multi-document YAML stream, exactly as committed in `crds/`.
///
/// # Errors
/// When YAML serialization fails (it does not for these types).
pub fn yaml() -> Result<String, serde_saphyr::ser::Error> {
    all()
        .iter()
        .map(document)
        .collect::<Result<Vec<_>, _>>()
        .map(|docs| docs.concat())
}

/// One CRD as a YAML document that starts with `---`.
///
/// # Errors
/// When YAML serialization fails.
pub fn document(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::ser::Error> {
    Ok(format!("---\n{}", serde_saphyr::to_string(crd)?))
}

/// The file name of a CRD under `crds/` (`<plural>.<group>.yaml`).
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// Post-processing of the generated CRD that the derive cannot express.
///
/// schemars marks every `Option` field `nullable: true`. With `nullable` an explicit `null` is
/// stored and makes `has()` true in CEL rules, so `{generate: {}, secretRef: null}` would break
/// the "exactly one" rules; without it the API server prunes nulls before validation. None of
/// our fields means anything by `null`, so the flag is removed everywhere.
fn finish(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for v in &mut crd.spec.versions {
        if let Some(schema) = v
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            strip_nullable(schema);
        }
    }
    crd
}

fn strip_nullable(
    s: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
) {
    s.nullable = None;
    if let Some(props) = &mut s.properties {
        props.values_mut().for_each(strip_nullable);
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items)) = &mut s.items {
        strip_nullable(items);
    }
    if let Some(
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrBool::Schema(ap),
    ) = &mut s.additional_properties
    {
        strip_nullable(ap);
    }
    for list in [&mut s.all_of, &mut s.any_of, &mut s.one_of]
        .into_iter()
        .flatten()
    {
        list.iter_mut().for_each(strip_nullable);
    }
}
