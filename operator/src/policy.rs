//! Compiles a namespace's `MeshPolicy` objects into the policy document sidecars enforce
//! ([`medmesh_core::policy::PolicyDoc`]), with one outcome per policy for its conditions.
//!
//! A pure decision over gathered input ([`Snapshot`]): the reconciler lists the namespace's
//! policies, `AuditLedger`s and Secrets, calls [`compile`], publishes the document in the
//! `medmesh-policy` ConfigMap and writes each policy's conditions from its [`Outcome`].
//!
//! # Semantics
//! - A policy is accepted or refused whole: any invalid reference (an identity outside the trust
//!   domain, a malformed service account or namespace, an unknown `AuditLedger`, a missing Secret
//!   key, an invalid pod selector) refuses it with a message listing every problem, and it
//!   contributes nothing. The others still apply.
//! - Every injected pod of a namespace mounts the same ConfigMap, so [`compile`] merges the
//!   accepted policies: a port's allowed peers are the union over the policies that list it.
//!   [`compile_for_labels`] restricts the merge to the policies whose `podSelector` selects
//!   given pod labels; publishing per-workload documents needs the sidecar to know its labels
//!   (downward API) and is not wired yet.
//! - Conflicts refuse the policy that comes later in name order: the same port with two
//!   protocol hints, or two different audit settings in one namespace.
//! - The document is in `audit` mode only when every accepted policy is; an `audit` policy next
//!   to `enforce` ones is accepted with a `Degraded` message saying it is enforced.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use medmesh_core::policy::{
    InboundPort, Mode, PodSelector, Policy, PolicyDoc, PolicySet, Principal, ProtocolHint,
    SelectedDoc, SelectorOperator, SelectorRequirement,
};
use medmesh_core::{SpiffeId, TrustDomain};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{
    AuditDelivery, Condition, MeshPolicy, Peer, PolicyMode, PortProtocol, SecretKeyRef, condition,
};
use crate::names::POLICY_CONFIGMAP;

#[cfg(test)]
mod tests;

/// What [`compile`] reads: everything it needs, gathered by the caller.
#[derive(Debug, Clone)]
pub struct Snapshot<'a> {
    /// The namespace compiled.
    pub namespace: &'a str,
    /// The mesh trust domain.
    pub trust_domain: &'a TrustDomain,
    /// The namespace's policies (any order).
    pub policies: &'a [MeshPolicy],
    /// `AuditLedger`s of the namespace: name → endpoint, when known.
    pub ledgers: &'a BTreeMap<String, Option<String>>,
    /// Secrets of the namespace: name → keys.
    pub secrets: &'a BTreeMap<String, BTreeSet<String>>,
}

/// Where the selected pods' audit records go (sidecar settings, not part of the document).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditBinding {
    /// Name of the `AuditLedger`.
    pub ledger: String,
    /// Its endpoint, once the ledger reports one.
    pub endpoint: Option<String>,
    /// Delivery mode.
    pub delivery: AuditDelivery,
    /// The keyed-hash key.
    pub key: SecretKeyRef,
    /// Archiving of stored instances, as the policy asks for it (the archive is resolved by
    /// the controller).
    pub archive: Option<crate::crd::PolicyArchive>,
}

/// Why a policy was refused or degraded: a bounded reason for the condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Compiled and published.
    Compiled,
    /// An identity, selector or reference is invalid.
    InvalidReference,
    /// It contradicts a policy earlier in name order.
    Conflict,
    /// Accepted, but its `audit` mode is overridden by `enforce` policies.
    ModeOverridden,
}

impl Reason {
    /// The condition reason (CamelCase).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Compiled => "Compiled",
            Self::InvalidReference => "InvalidReference",
            Self::Conflict => "Conflict",
            Self::ModeOverridden => "ModeOverridden",
        }
    }
}

/// The result for one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the policy contributes to the document.
    pub accepted: bool,
    /// Why.
    pub reason: Reason,
    /// What the user should know (every problem, for a refused policy).
    pub message: String,
    /// The `metadata.generation` compiled.
    pub generation: Option<i64>,
}

impl Outcome {
    /// The policy's `Ready`, `Progressing` and `Degraded` conditions, merged into `existing`
    /// (a condition whose status did not change keeps its `lastTransitionTime`).
    pub fn conditions(&self, existing: &[Condition], now: &Time) -> Vec<Condition> {
        let degraded = !self.accepted || self.reason != Reason::Compiled;
        let mut out = existing.to_vec();
        for (type_, status) in [
            (condition::READY, self.accepted),
            (condition::PROGRESSING, false),
            (condition::DEGRADED, degraded),
        ] {
            condition::set(
                &mut out,
                condition::new(
                    type_,
                    status,
                    self.reason.as_str(),
                    &self.message,
                    self.generation,
                    now,
                ),
            );
        }
        out
    }
}

/// The compiled namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    /// The union of the (selected) accepted policies: what a pod selected by all of them gets.
    pub doc: PolicyDoc,
    /// What sidecars read: each accepted policy with its selector; a sidecar enforces the union
    /// of those selecting its pod.
    pub set: PolicySet,
    /// Audit settings of the namespace, when a policy has them.
    pub audit: Option<AuditBinding>,
    /// Per policy name.
    pub outcomes: BTreeMap<String, Outcome>,
}

impl Compiled {
    /// The document as the JSON stored in the ConfigMap.
    ///
    /// # Errors
    /// When serialization fails (it does not for these types).
    pub fn json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(&self.set)
    }
}

/// Compiles every policy of the namespace (see the module documentation).
pub fn compile(snap: &Snapshot<'_>) -> Compiled {
    compile_selected(snap, None)
}

/// Compiles the policies whose `podSelector` selects a pod with these labels.
pub fn compile_for_labels(snap: &Snapshot<'_>, labels: &BTreeMap<String, String>) -> Compiled {
    compile_selected(snap, Some(labels))
}

/// A policy that passed its own checks and the conflict checks.
struct Accepted {
    name: String,
    mode: PolicyMode,
    generation: Option<i64>,
    selected: bool,
    ports: Vec<u16>,
}

/// A policy checked on its own.
struct Checked {
    name: String,
    mode: PolicyMode,
    ports: Vec<InboundPort>,
    audit: Option<AuditBinding>,
    selector: Selector,
    pod_selector: PodSelector,
}

fn compile_selected(snap: &Snapshot<'_>, labels: Option<&BTreeMap<String, String>>) -> Compiled {
    let mut policies: Vec<&MeshPolicy> = snap.policies.iter().collect();
    policies.sort_by_key(|p| p.name_any());
    let mut outcomes = BTreeMap::new();
    let mut checked = Vec::new();
    for p in policies {
        match check(snap, p) {
            Ok(c) => checked.push((c, p.metadata.generation)),
            Err(errs) => {
                outcomes.insert(
                    p.name_any(),
                    Outcome {
                        accepted: false,
                        reason: Reason::InvalidReference,
                        message: errs.join("; "),
                        generation: p.metadata.generation,
                    },
                );
            }
        }
    }

    let mut ports: BTreeMap<u16, (InboundPort, String)> = BTreeMap::new();
    let mut audit: Option<(AuditBinding, String)> = None;
    let mut accepted = Vec::new();
    let mut set = PolicySet::default();
    for (c, generation) in checked {
        let mut conflicts = Vec::new();
        for p in &c.ports {
            if let Some((have, owner)) = ports.get(&p.port)
                && have.protocol != p.protocol
            {
                conflicts.push(format!(
                    "port {} has protocol {} here but {} in policy {owner}",
                    p.port,
                    hint_name(p.protocol),
                    hint_name(have.protocol)
                ));
            }
        }
        if let (Some(mine), Some((have, owner))) = (&c.audit, &audit)
            && mine != have
        {
            conflicts.push(format!(
                "audit settings differ from policy {owner} (one ledger, delivery, key and archive per namespace)"
            ));
        }
        if !conflicts.is_empty() {
            outcomes.insert(
                c.name.clone(),
                Outcome {
                    accepted: false,
                    reason: Reason::Conflict,
                    message: conflicts.join("; "),
                    generation,
                },
            );
            continue;
        }
        // The outcome of a policy does not depend on the pod being compiled for, so conflicts
        // are found among all policies; only the document is restricted to selected ones.
        let selected = labels.is_none_or(|l| c.selector.matches(l));
        if let Some(a) = &c.audit
            && audit.is_none()
        {
            audit = Some((a.clone(), c.name.clone()));
        }
        for p in &c.ports {
            let entry = ports.entry(p.port).or_insert_with(|| {
                (
                    InboundPort {
                        allow: Vec::new(),
                        ..p.clone()
                    },
                    c.name.clone(),
                )
            });
            if selected {
                for a in &p.allow {
                    if !entry.0.allow.contains(a) {
                        entry.0.allow.push(a.clone());
                    }
                }
            }
        }
        set.selected.push(SelectedDoc {
            selector: c.pod_selector.clone(),
            document: PolicyDoc {
                mode: match c.mode {
                    PolicyMode::Audit => Mode::Audit,
                    PolicyMode::Enforce => Mode::Enforce,
                },
                inbound: c.ports.clone(),
                external: Vec::new(),
                pinned: Vec::new(),
            },
        });
        accepted.push(Accepted {
            ports: c.ports.iter().map(|p| p.port).collect(),
            name: c.name,
            mode: c.mode,
            generation,
            selected,
        });
    }

    let selected_ports: BTreeSet<u16> = accepted
        .iter()
        .filter(|a| a.selected)
        .flat_map(|a| a.ports.iter().copied())
        .collect();
    let enforcing: Vec<&str> = accepted
        .iter()
        .filter(|a| a.selected && a.mode == PolicyMode::Enforce)
        .map(|a| a.name.as_str())
        .collect();
    let all_audit = accepted.iter().any(|a| a.selected) && enforcing.is_empty();
    for a in accepted.iter() {
        let (reason, message) = if a.mode == PolicyMode::Audit && !enforcing.is_empty() {
            (
                Reason::ModeOverridden,
                format!(
                    "compiled, but enforced: policies {} of this namespace are in enforce mode",
                    enforcing.join(", ")
                ),
            )
        } else {
            (
                Reason::Compiled,
                format!("compiled into ConfigMap {POLICY_CONFIGMAP}"),
            )
        };
        outcomes.insert(
            a.name.clone(),
            Outcome {
                accepted: true,
                reason,
                message,
                generation: a.generation,
            },
        );
    }

    let doc = PolicyDoc {
        mode: if all_audit {
            Mode::Audit
        } else {
            Mode::Enforce
        },
        inbound: ports
            .into_values()
            .map(|(p, _)| p)
            .filter(|p| selected_ports.contains(&p.port))
            .collect(),
        external: Vec::new(),
        pinned: Vec::new(),
    };
    Compiled {
        doc,
        set,
        audit: audit.map(|(a, _)| a),
        outcomes,
    }
}

fn hint_name(h: ProtocolHint) -> &'static str {
    match h {
        ProtocolHint::Detect => "detect",
        ProtocolHint::Dicom => "dicom",
        ProtocolHint::Http => "http",
        ProtocolHint::Opaque => "opaque",
    }
}

/// A DNS-1123 label (namespace and most object names).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (service account and Secret names).
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The core form of a (checked) Kubernetes label selector.
fn pod_selector(s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector) -> PodSelector {
    PodSelector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: s
            .match_expressions
            .iter()
            .flatten()
            .filter_map(|r| {
                let operator = match r.operator.as_str() {
                    "In" => SelectorOperator::In,
                    "NotIn" => SelectorOperator::NotIn,
                    "Exists" => SelectorOperator::Exists,
                    "DoesNotExist" => SelectorOperator::DoesNotExist,
                    // Refused by the selector check before this is called.
                    _ => return None,
                };
                Some(SelectorRequirement {
                    key: r.key.clone(),
                    operator,
                    values: r.values.clone().unwrap_or_default(),
                })
            })
            .collect(),
    }
}

/// Checks one policy on its own, listing every problem.
fn check(snap: &Snapshot<'_>, p: &MeshPolicy) -> Result<Checked, Vec<String>> {
    let mut errs = Vec::new();
    let td = snap.trust_domain;
    let selector = Selector::try_from(p.spec.pod_selector.clone())
        .map_err(|e| errs.push(format!("podSelector: {}", e.0)))
        .ok();
    let mut seen = BTreeSet::new();
    let mut ports = Vec::new();
    for (i, rule) in p.spec.ports.iter().enumerate() {
        let at = format!("ports[{i}]");
        let port = match u16::try_from(rule.port) {
            Ok(port) if port > 0 => port,
            _ => {
                errs.push(format!("{at}: port {} is not 1-65535", rule.port));
                continue;
            }
        };
        if !seen.insert(port) {
            errs.push(format!("{at}: port {port} listed twice"));
        }
        let mut allow = Vec::new();
        for (j, peer) in rule.allow.iter().enumerate() {
            match principal(snap.namespace, td, peer) {
                Ok(a) => {
                    if !allow.contains(&a) {
                        allow.push(a);
                    }
                }
                Err(e) => errs.push(format!("{at}.allow[{j}]: {e}")),
            }
        }
        ports.push(InboundPort {
            port,
            protocol: match rule.protocol {
                None => ProtocolHint::Detect,
                Some(PortProtocol::Dicom) => ProtocolHint::Dicom,
                Some(PortProtocol::Http) => ProtocolHint::Http,
                Some(PortProtocol::Opaque) => ProtocolHint::Opaque,
            },
            allow,
            permissive: false,
        });
    }
    let audit = p.spec.audit.as_ref().and_then(|a| {
        let before = errs.len();
        let endpoint = match snap.ledgers.get(&a.ledger_ref.name) {
            Some(e) => e.clone(),
            None => {
                errs.push(format!(
                    "audit.ledgerRef: AuditLedger {}/{} not found",
                    snap.namespace, a.ledger_ref.name
                ));
                None
            }
        };
        let key = &a.key_secret_ref;
        match snap.secrets.get(&key.name) {
            None => errs.push(format!(
                "audit.keySecretRef: Secret {}/{} not found",
                snap.namespace, key.name
            )),
            Some(keys) if !keys.contains(&key.key) => errs.push(format!(
                "audit.keySecretRef: Secret {}/{} has no key {:?}",
                snap.namespace, key.name, key.key
            )),
            Some(_) => {}
        }
        (errs.len() == before).then(|| AuditBinding {
            ledger: a.ledger_ref.name.clone(),
            endpoint,
            delivery: a.delivery,
            key: key.clone(),
            archive: a.archive.clone(),
        })
    });
    // The document must also pass the sidecar's own checks, or every sidecar would refuse it.
    if errs.is_empty() {
        let doc = PolicyDoc {
            inbound: ports.clone(),
            ..PolicyDoc::default()
        };
        if let Err(e) = Policy::new(doc, td.clone()) {
            errs.push(e.to_string());
        }
    }
    match (errs.is_empty(), selector) {
        (true, Some(selector)) => Ok(Checked {
            name: p.name_any(),
            mode: p.spec.mode,
            ports,
            audit,
            selector,
            pod_selector: pod_selector(&p.spec.pod_selector),
        }),
        _ => Err(errs),
    }
}

fn principal(namespace: &str, td: &TrustDomain, peer: &Peer) -> Result<Principal, String> {
    match (&peer.spiffe_id, &peer.service_account, &peer.namespace) {
        (Some(id), None, None) => {
            let id: SpiffeId = id.parse().map_err(|e| format!("spiffeId: {e}"))?;
            if id.is_in(td) {
                Ok(Principal::Id(id))
            } else {
                Err(format!("spiffeId {id} is outside trust domain {td}"))
            }
        }
        (None, Some(sa), None) => {
            let ns = sa.namespace.as_deref().unwrap_or(namespace);
            if !is_dns_label(ns) {
                return Err(format!(
                    "serviceAccount.namespace {ns:?} is not a namespace name"
                ));
            }
            if !is_dns_subdomain(&sa.name) {
                return Err(format!(
                    "serviceAccount.name {:?} is not a service account name",
                    sa.name
                ));
            }
            Ok(Principal::ServiceAccount(format!("{ns}/{}", sa.name)))
        }
        (None, None, Some(ns)) => {
            if is_dns_label(ns) {
                Ok(Principal::Namespace(ns.clone()))
            } else {
                Err(format!("namespace {ns:?} is not a namespace name"))
            }
        }
        _ => Err("exactly one of spiffeId, serviceAccount or namespace must be set".into()),
    }
}
