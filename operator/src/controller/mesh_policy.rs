//! The `MeshPolicy` controller, keyed by namespace.
//!
//! For a namespace that has `MeshPolicy` objects or the label `medmesh.io/inject=enabled`:
//! - ConfigMap [`POLICY_CONFIGMAP`] with the compiled policy set (each accepted policy's
//!   document and pod selector; empty, so deny-all, when there are no policies). Its ownerReferences
//!   are the namespace's policies (none of them the controller), so the garbage collector
//!   removes it once every policy is gone, unless the namespace is labelled, in which case
//!   the next reconcile publishes it again without owners;
//! - ConfigMap [`IDENTITY_CA_CONFIGMAP`] with `ca.crt`, the CA of the operator's HTTPS
//!   certificate, which injected sidecars mount to trust the identity service;
//! - each policy's `status` (its outcome from [`policy::compile`], invalid references listed);
//! - when the policies audit and their ledger is up: `audit.json` in the policy ConfigMap (the
//!   ledger's endpoint, server identity, origin and verifier key, the delivery mode) and the
//!   Secret [`AUDIT_KEY_SECRET`] with a copy of the keyed-hash key, which injected
//!   sidecars read (`MEDMESH_AUDIT_CONFIG`);
//! - when the audit settings archive into an `ImageArchive` that reports its endpoint: the
//!   namespace's archive key pair, Secret [`ARCHIVE_KEY_SECRET`], generated once and owned by
//!   nobody (deleting it is crypto-shredding); its recipient, the break-glass recipient, the
//!   archive's endpoint, identity and replication in `audit.json`; and a Role that can get
//!   only that Secret, bound to the policy's `restorers`.
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
use medmesh_core::policy::PolicySet;
use medmesh_core::wire::SidecarAudit;

use super::{Context, Error, MANAGED_BY, apply_params, k8s_time, kube_err};
use crate::crd::{AuditLedger, MeshPolicy, MeshPolicyStatus};
use crate::names::{
    ARCHIVE_IDENTITY_KEY, ARCHIVE_KEY_SECRET, ARCHIVE_RECIPIENT_KEY, ARCHIVE_RESTORER_ROLE,
    AUDIT_CONFIG_KEY, AUDIT_KEY_MOUNT, AUDIT_KEY_NAME, AUDIT_KEY_SECRET, IDENTITY_CA_CONFIGMAP,
    IDENTITY_CA_KEY, INJECT_LABEL, POLICY_CONFIGMAP, POLICY_KEY,
};
use crate::policy::{self, Compiled, Snapshot};

#[cfg(test)]
mod tests;

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
    audit: Option<&SidecarAudit>,
    owners: Vec<OwnerReference>,
) -> Result<ConfigMap, Error> {
    let json = match compiled {
        Some(c) => c.json(),
        None => serde_json::to_string_pretty(&PolicySet::default()),
    }
    .map_err(|e| Error::Serialize {
        what: format!("ConfigMap {namespace}/{}", POLICY_CONFIGMAP),
        reason: e.to_string(),
    })?;
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(POLICY_CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels()),
            owner_references: Some(owners),
            ..ObjectMeta::default()
        },
        data: Some(
            std::iter::once((POLICY_KEY.to_owned(), json))
                .chain(audit.map(|a| {
                    (
                        AUDIT_CONFIG_KEY.to_owned(),
                        serde_json::to_string_pretty(a).unwrap_or_default(),
                    )
                }))
                .collect(),
        ),
        ..ConfigMap::default()
    })
}

/// What the sidecars of a namespace need to audit into `binding`'s ledger, once that ledger
/// reports an endpoint and published its origin and verifier key; `None` until then.
pub fn sidecar_audit(
    binding: &policy::AuditBinding,
    namespace: &str,
    td: &medmesh_core::TrustDomain,
    ledger_config: Option<&ConfigMap>,
) -> Option<SidecarAudit> {
    let endpoint = binding.endpoint.clone()?;
    let data = ledger_config?.data.as_ref()?;
    Some(SidecarAudit {
        ledger_url: endpoint,
        ledger_id: Some(format!(
            "spiffe://{td}/ns/{namespace}/ledger/{}",
            binding.ledger
        )),
        ledger_verifier: data
            .get(super::audit_ledger::VERIFIER_KEY)?
            .trim()
            .to_owned(),
        ledger_origin: data.get("origin")?.trim().to_owned(),
        delivery: match binding.delivery {
            crate::crd::AuditDelivery::Enforce => "enforce".into(),
            crate::crd::AuditDelivery::Spool => "spool".into(),
        },
        key_file: format!("{}/{}", AUDIT_KEY_MOUNT, AUDIT_KEY_NAME),
        archive: None,
    })
}

/// The Secret with the namespace's copy of the keyed-hash key.
pub fn audit_key_secret(
    namespace: &str,
    key: k8s_openapi::ByteString,
    owners: Vec<OwnerReference>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(AUDIT_KEY_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels()),
            owner_references: Some(owners),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(AUDIT_KEY_NAME.to_owned(), key)])),
        ..Secret::default()
    }
}

/// The namespace's archive key pair as a Secret: generated by the caller once, never owned
/// (deleting it is crypto-shredding, which must not happen by garbage collection).
pub fn archive_key_secret(namespace: &str, key: &medmesh_core::seal::ArchiveKey) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(ARCHIVE_KEY_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([
            (ARCHIVE_IDENTITY_KEY.to_owned(), key.to_secret_string()),
            (
                ARCHIVE_RECIPIENT_KEY.to_owned(),
                key.recipient().to_string(),
            ),
        ])),
        ..Secret::default()
    }
}

/// What the sidecars need to archive into `archive` (its status names the endpoint), sealed to
/// `recipient` and the policy's break-glass recipient; `None` until the archive reports an
/// endpoint.
pub fn sidecar_archive(
    policy: &crate::crd::PolicyArchive,
    archive: &crate::crd::ImageArchive,
    recipient: &str,
    td: &medmesh_core::TrustDomain,
) -> Option<medmesh_core::wire::SidecarArchive> {
    let endpoint = archive.status.as_ref()?.endpoint.clone()?;
    let ns = archive.metadata.namespace.as_deref()?;
    let id = td.workload(ns, &archive.name_any()).ok()?;
    Some(medmesh_core::wire::SidecarArchive {
        url: endpoint,
        id: id.to_string(),
        recipients: std::iter::once(recipient.to_owned())
            .chain(policy.break_glass_recipient.clone())
            .collect(),
        mode: match policy.mode {
            crate::crd::ArchiveMode::Async => "async".into(),
            crate::crd::ArchiveMode::Required => "required".into(),
        },
        replication_min: u32::try_from(archive.spec.replication.min).unwrap_or(1),
        replication_max: u32::try_from(archive.spec.replication.max).unwrap_or(1),
    })
}

/// The Role that can read only the archive key Secret, and its binding to `restorers`.
pub fn restorer_rbac(
    namespace: &str,
    restorers: &[k8s_openapi::api::rbac::v1::Subject],
    owners: Vec<OwnerReference>,
) -> (
    k8s_openapi::api::rbac::v1::Role,
    k8s_openapi::api::rbac::v1::RoleBinding,
) {
    use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef};
    let meta = ObjectMeta {
        name: Some(ARCHIVE_RESTORER_ROLE.into()),
        namespace: Some(namespace.into()),
        labels: Some(labels()),
        owner_references: Some(owners),
        ..ObjectMeta::default()
    };
    (
        Role {
            metadata: meta.clone(),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["secrets".into()]),
                resource_names: Some(vec![ARCHIVE_KEY_SECRET.into()]),
                verbs: vec!["get".into()],
                ..PolicyRule::default()
            }]),
        },
        RoleBinding {
            metadata: meta,
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: ARCHIVE_RESTORER_ROLE.into(),
            },
            subjects: Some(restorers.to_vec()),
        },
    )
}

/// The namespace's archive recipient: read from [`ARCHIVE_KEY_SECRET`], or a key pair
/// generated and created now (once: a concurrent creation wins and is read back).
async fn archive_recipient(client: &kube::Client, namespace: &str) -> Result<String, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let what = format!("Secret {namespace}/{ARCHIVE_KEY_SECRET}");
    let read = |s: &Secret| -> Option<String> {
        let v = s.data.as_ref()?.get(ARCHIVE_RECIPIENT_KEY)?;
        let text = std::str::from_utf8(&v.0).ok()?.trim().to_owned();
        text.parse::<medmesh_core::seal::Recipient>().ok()?;
        Some(text)
    };
    if let Some(s) = secrets
        .get_opt(ARCHIVE_KEY_SECRET)
        .await
        .map_err(kube_err(format!("get {what}")))?
    {
        return read(&s).ok_or_else(|| Error::Serialize {
            what: what.clone(),
            reason: format!("{ARCHIVE_RECIPIENT_KEY} is not an age recipient"),
        });
    }
    let key = medmesh_core::seal::ArchiveKey::generate();
    match secrets
        .create(&Default::default(), &archive_key_secret(namespace, &key))
        .await
    {
        Ok(_) => Ok(key.recipient().to_string()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = secrets
                .get(ARCHIVE_KEY_SECRET)
                .await
                .map_err(kube_err(format!("get {what}")))?;
            read(&s).ok_or_else(|| Error::Serialize {
                what,
                reason: format!("{ARCHIVE_RECIPIENT_KEY} is not an age recipient"),
            })
        }
        Err(e) => Err(kube_err(format!("create {what}"))(e)),
    }
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
            ports: Some(p.spec.ports_summary()),
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
            .get_opt(POLICY_CONFIGMAP)
            .await
            .map_err(kube_err(format!(
                "get ConfigMap {namespace}/{}",
                POLICY_CONFIGMAP
            )))?
            .is_some_and(|c| {
                c.labels()
                    .get("app.kubernetes.io/managed-by")
                    .map(String::as_str)
                    == Some(MANAGED_BY)
            });
        if stale {
            let cm = policy_config_map(&namespace, None, None, Vec::new())?;
            config_maps
                .patch(POLICY_CONFIGMAP, &apply_params(), &Patch::Apply(&cm))
                .await
                .map_err(kube_err(format!(
                    "apply ConfigMap {namespace}/{}",
                    POLICY_CONFIGMAP
                )))?;
        }
        return Ok(Action::requeue(RESYNC));
    }

    // Ledgers and Secrets are only needed to check audit references.
    let mut ledgers = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    let mut secret_data = BTreeMap::new();
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
            secret_data.insert(s.name_any(), s.data.clone().unwrap_or_default());
        }
    }
    let compiled = policy::compile(&Snapshot {
        namespace: &namespace,
        trust_domain: &ctx.trust_domain,
        policies: &policies,
        ledgers: &ledgers,
        secrets: &secrets,
    });
    let owners: Vec<OwnerReference> = policies.iter().filter_map(policy_owner).collect();
    // Auditing: the ledger's published settings and the key, once both are there.
    let mut audit = None;
    if let Some(b) = &compiled.audit
        && b.endpoint.is_some()
        && let Some(key) = secret_data
            .get(&b.key.name)
            .and_then(|d| d.get(&b.key.key))
            .cloned()
    {
        let ledger_config = config_maps
            .get_opt(&format!("{}-config", b.ledger))
            .await
            .map_err(kube_err(format!(
                "get ConfigMap {namespace}/{}-config",
                b.ledger
            )))?;
        audit = sidecar_audit(b, &namespace, &ctx.trust_domain, ledger_config.as_ref());
        // Archiving, once the archive reports its endpoint: the namespace's key pair (made
        // once), the restorers' access to its private half, the sidecars' settings.
        if let (Some(a), Some(pa)) = (audit.as_mut(), &b.archive) {
            let archive = Api::<crate::crd::ImageArchive>::namespaced(client.clone(), &namespace)
                .get_opt(&pa.archive_ref.name)
                .await
                .map_err(kube_err(format!(
                    "get ImageArchive {namespace}/{}",
                    pa.archive_ref.name
                )))?;
            if let Some(archive) = archive {
                let recipient = archive_recipient(&client, &namespace).await?;
                a.archive = sidecar_archive(pa, &archive, &recipient, &ctx.trust_domain);
                if !pa.restorers.is_empty() {
                    let (role, binding) = restorer_rbac(&namespace, &pa.restorers, owners.clone());
                    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(client.clone(), &namespace)
                        .patch(ARCHIVE_RESTORER_ROLE, &apply_params(), &Patch::Apply(&role))
                        .await
                        .map_err(kube_err(format!(
                            "apply Role {namespace}/{ARCHIVE_RESTORER_ROLE}"
                        )))?;
                    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(
                        client.clone(),
                        &namespace,
                    )
                    .patch(
                        ARCHIVE_RESTORER_ROLE,
                        &apply_params(),
                        &Patch::Apply(&binding),
                    )
                    .await
                    .map_err(kube_err(format!(
                        "apply RoleBinding {namespace}/{ARCHIVE_RESTORER_ROLE}"
                    )))?;
                }
            }
        }
        if audit.is_some() {
            let secret = audit_key_secret(&namespace, key, owners.clone());
            Api::<Secret>::namespaced(client.clone(), &namespace)
                .patch(AUDIT_KEY_SECRET, &apply_params(), &Patch::Apply(&secret))
                .await
                .map_err(kube_err(format!(
                    "apply Secret {namespace}/{}",
                    AUDIT_KEY_SECRET
                )))?;
        }
    }
    let cm = policy_config_map(&namespace, Some(&compiled), audit.as_ref(), owners)?;
    config_maps
        .patch(POLICY_CONFIGMAP, &apply_params(), &Patch::Apply(&cm))
        .await
        .map_err(kube_err(format!(
            "apply ConfigMap {namespace}/{}",
            POLICY_CONFIGMAP
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
