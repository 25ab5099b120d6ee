//! What the controllers' children have in common: object metadata, Service ports, volume
//! claims, spreading, the one-down disruption budget, and the server-side apply of a child and
//! of a status. (The restricted security contexts are in [`crate::security`], which the webhook
//! shares.)

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, ServicePort, TopologySpreadConstraint,
    VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ObjectMeta, Patch};

use super::{Error, apply_params, kube_err};

/// Metadata of an owned child.
pub fn meta(
    name: &str,
    namespace: &str,
    labels: BTreeMap<String, String>,
    owner: &OwnerReference,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// A TCP Service port `name` forwarding to `target` (a container port's name, or a number when
/// the container declares no such port).
pub fn service_port(name: &str, port: i32, target: IntOrString) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(target),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// Spread replicas across nodes, but still schedule on a single-node cluster (DoNotSchedule
/// would leave replicas Pending there).
pub fn spread(selector: BTreeMap<String, String>) -> TopologySpreadConstraint {
    TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "kubernetes.io/hostname".into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    }
}

/// A volume claim template `name` of `size`.
pub fn claim(
    name: &str,
    selector: BTreeMap<String, String>,
    size: &Quantity,
    class: Option<&String>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(selector),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: class.cloned(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), size.clone())])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// A PodDisruptionBudget letting one replica at a time be evicted (never zero, which would
/// block every node drain).
pub fn one_down_pdb(meta: ObjectMeta, selector: BTreeMap<String, String>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// Server-side applies `obj` (a `what`, for the error).
///
/// # Errors
/// When the API request fails.
pub async fn apply<K>(api: &Api<K>, obj: &K, what: &str) -> Result<K, Error>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &apply_params(), &Patch::Apply(obj))
        .await
        .map_err(kube_err(format!("apply {what} {name}")))
}

/// Server-side applies `status` to the `/status` of `kind` `name` (a medmesh resource).
///
/// # Errors
/// When the API request fails.
pub async fn apply_status<K>(
    api: &Api<K>,
    kind: &str,
    namespace: &str,
    name: &str,
    status: &impl serde::Serialize,
) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let body = serde_json::json!({
        "apiVersion": "medmesh.io/v1alpha1",
        "kind": kind,
        "status": status,
    });
    api.patch_status(name, &apply_params(), &Patch::Apply(&body))
        .await
        .map_err(kube_err(format!(
            "patch status of {kind} {namespace}/{name}"
        )))?;
    Ok(())
}
