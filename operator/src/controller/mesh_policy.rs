//! The `MeshPolicy` controller, keyed by namespace.
//!
//! For a namespace that has `MeshPolicy` objects or the label `medmesh.io/inject=enabled`:
//! - ConfigMap [`policy::CONFIGMAP`] with the compiled document (a deny-all document when there
//!   are no policies: the sidecar refuses to start without a policy file). Its ownerReferences
//!   are the namespace's policies (none of them the controller), so the garbage collector
//!   removes it once every policy is gone, unless the namespace is labelled, in which case
//!   the next reconcile publishes it again without owners;
//! - ConfigMap [`IDENTITY_CA_CONFIGMAP`] with `ca.crt`, the CA of the operator's HTTPS
//!   certificate, which injected sidecars mount to trust the identity service;
//! - each policy's `status` (its outcome from [`policy::compile`], invalid references listed).
//!
//! A namespace with neither keeps nothing of ours except a stale policy ConfigMap, which is
//! reduced to deny-all (there is no delete verb).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, ListParams, ObjectMeta, Patch};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use medmesh_core::policy::PolicyDoc;

use super::{Context, Error, MANAGED_BY, apply_params, k8s_time, kube_err};
use crate::crd::{AuditLedger, MeshPolicy, MeshPolicyStatus};
use crate::policy::{self, Compiled, Snapshot};
use crate::webhook::INJECT_LABEL;

#[cfg(test)]
mod tests;

/// ConfigMap (in each meshed namespace) holding the identity service's CA.
pub const IDENTITY_CA_CONFIGMAP: &str = "medmesh-identity-ca";
/// Its key.
pub const IDENTITY_CA_KEY: &str = "ca.crt";
/// How often a namespace is looked at again without a change.
pub const RESYNC: Duration = Duration::from_secs(300);

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/part-of".into(), "medmesh".into()),
        ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
    ])
}

/// The policy ConfigMap for a compiled namespace (or deny-all when `compiled` is `None`).
///
/// # Errors
/// When serialization fails (it does not).
pub fn policy_config_map(
    namespace: &str,
    compiled: Option<&Compiled>,
    owners: Vec<OwnerReference>,
) -> Result<ConfigMap, Error> {
    let json = match compiled {
        Some(c) => c.json(),
        None => serde_json::to_string_pretty(&PolicyDoc::default()),
    }
    .map_err(|e| Error::Serialize {
        what: format!("ConfigMap {namespace}/{}", policy::CONFIGMAP),
        reason: e.to_string(),
    })?;
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(policy::CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels()),
            owner_references: Some(owners),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(policy::CONFIGMAP_KEY.to_owned(), json)])),
        ..ConfigMap::default()
    })
}

/// The identity-CA ConfigMap.
pub fn identity_ca_config_map(namespace: &str, ca_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(IDENTITY_CA_CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            IDENTITY_CA_KEY.to_owned(),
            ca_pem.to_owned(),
        )])),
        ..ConfigMap::default()
    }
}

/// A non-controller owner reference to a policy (deleting the policy does not wait for the
/// ConfigMap).
fn policy_owner(p: &MeshPolicy) -> Option<OwnerReference> {
    p.controller_owner_ref(&()).map(|mut o| {
        o.controller = None;
        o.block_owner_deletion = None;
        o
    })
}

/// The status each policy should have, for those whose stored status differs.
pub fn status_updates(
    policies: &[MeshPolicy],
    compiled: &Compiled,
    now: &Time,
) -> Vec<(String, MeshPolicyStatus)> {
    let mut out = Vec::new();
    for p in policies {
        let name = p.name_any();
        let Some(outcome) = compiled.outcomes.get(&name) else {
            continue;
        };
        let old = p.status.clone().unwrap_or_default();
        let new = MeshPolicyStatus {
            observed_generation: p.metadata.generation,
            conditions: outcome.conditions(&old.conditions, now),
        };
        if p.status.as_ref() != Some(&new) {
            out.push((name, new));
        }
    }
    out
}

/// Reconciles one namespace (see the module documentation).
///
/// # Errors
/// When an API request fails; the controller retries.
pub async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = ns.name_any();
    let client = ctx.client.clone();
    let labelled = ns
        .labels()
        .get(INJECT_LABEL)
        .is_some_and(|v| v == "enabled");
    let policies_api: Api<MeshPolicy> = Api::namespaced(client.clone(), &namespace);
    let policies = policies_api
        .list(&ListParams::default())
        .await
        .map_err(kube_err(format!("list MeshPolicies in {namespace}")))?
        .items;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);

    if policies.is_empty() && !labelled {
        let stale = config_maps
            .get_opt(policy::CONFIGMAP)
            .await
            .map_err(kube_err(format!(
                "get ConfigMap {namespace}/{}",
                policy::CONFIGMAP
            )))?
            .is_some_and(|c| {
                c.labels()
                    .get("app.kubernetes.io/managed-by")
                    .map(String::as_str)
                    == Some(MANAGED_BY)
            });
        if stale {
            let cm = policy_config_map(&namespace, None, Vec::new())?;
            config_maps
                .patch(policy::CONFIGMAP, &apply_params(), &Patch::Apply(&cm))
                .await
                .map_err(kube_err(format!(
                    "apply ConfigMap {namespace}/{}",
                    policy::CONFIGMAP
                )))?;
        }
        return Ok(Action::requeue(RESYNC));
    }

    // Ledgers and Secrets are only needed to check audit references.
    let mut ledgers = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    if policies.iter().any(|p| p.spec.audit.is_some()) {
        for l in Api::<AuditLedger>::namespaced(client.clone(), &namespace)
            .list(&ListParams::default())
            .await
            .map_err(kube_err(format!("list AuditLedgers in {namespace}")))?
        {
            ledgers.insert(l.name_any(), l.status.and_then(|s| s.endpoint));
        }
        for s in Api::<Secret>::namespaced(client.clone(), &namespace)
            .list(&ListParams::default())
            .await
            .map_err(kube_err(format!("list Secrets in {namespace}")))?
        {
            let keys: BTreeSet<String> = s
                .data
                .iter()
                .flatten()
                .map(|(k, _)| k.clone())
                .chain(s.string_data.iter().flatten().map(|(k, _)| k.clone()))
                .collect();
            secrets.insert(s.name_any(), keys);
        }
    }
    let compiled = policy::compile(&Snapshot {
        namespace: &namespace,
        trust_domain: &ctx.trust_domain,
        policies: &policies,
        ledgers: &ledgers,
        secrets: &secrets,
    });
    let owners = policies.iter().filter_map(policy_owner).collect();
    let cm = policy_config_map(&namespace, Some(&compiled), owners)?;
    config_maps
        .patch(policy::CONFIGMAP, &apply_params(), &Patch::Apply(&cm))
        .await
        .map_err(kube_err(format!(
            "apply ConfigMap {namespace}/{}",
            policy::CONFIGMAP
        )))?;
    let ca = ctx.serving_ca.borrow().clone();
    if let Some(ca) = ca {
        config_maps
            .patch(
                IDENTITY_CA_CONFIGMAP,
                &apply_params(),
                &Patch::Apply(&identity_ca_config_map(&namespace, &ca)),
            )
            .await
            .map_err(kube_err(format!(
                "apply ConfigMap {namespace}/{IDENTITY_CA_CONFIGMAP}"
            )))?;
    }

    let now = k8s_time(ctx.now());
    for (name, status) in status_updates(&policies, &compiled, &now) {
        let body = serde_json::json!({
            "apiVersion": "medmesh.io/v1alpha1",
            "kind": "MeshPolicy",
            "status": status,
        });
        policies_api
            .patch_status(&name, &apply_params(), &Patch::Apply(&body))
            .await
            .map_err(kube_err(format!(
                "patch status of MeshPolicy {namespace}/{name}"
            )))?;
    }
    Ok(Action::requeue(RESYNC))
}
