use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use medmesh_core::policy::{Decision, Mode, Policy, Principal, ProtocolHint};
use medmesh_core::{SpiffeId, TrustDomain};

use super::*;
use crate::crd::MeshPolicy;

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn policy(name: &str, yaml: &str) -> MeshPolicy {
    let mut p: MeshPolicy = serde_saphyr::from_str(&format!(
        "apiVersion: medmesh.io/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: {name}, namespace: radiology, generation: 2}}\nspec:\n{yaml}"
    ))
    .unwrap();
    p.metadata.generation = Some(2);
    p
}

struct World {
    td: TrustDomain,
    ledgers: BTreeMap<String, Option<String>>,
    secrets: BTreeMap<String, BTreeSet<String>>,
}

impl World {
    fn new() -> Self {
        Self {
            td: td(),
            ledgers: BTreeMap::from([(
                "audit".to_owned(),
                Some("https://audit.radiology.svc:8443".to_owned()),
            )]),
            secrets: BTreeMap::from([("audit-key".to_owned(), BTreeSet::from(["key".to_owned()]))]),
        }
    }

    fn snap<'a>(&'a self, policies: &'a [MeshPolicy]) -> Snapshot<'a> {
        Snapshot {
            namespace: "radiology",
            trust_domain: &self.td,
            policies,
            ledgers: &self.ledgers,
            secrets: &self.secrets,
        }
    }
}

const PACS: &str = r#"
  podSelector: {matchLabels: {app: orthanc}}
  ports:
  - port: 4242
    protocol: dicom
    allow:
    - serviceAccount: {name: modality}
    - spiffeId: spiffe://cluster.local/ns/pacs/sa/viewer
  - port: 8042
    protocol: http
    allow:
    - namespace: viewers
  audit:
    ledgerRef: {name: audit}
    delivery: enforce
    keySecretRef: {name: audit-key, key: key}
"#;

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

#[test]
fn compiles_into_a_document_the_sidecar_accepts() {
    let w = World::new();
    let policies = [policy("pacs", PACS)];
    let c = compile(&w.snap(&policies));
    assert_eq!(c.doc.mode, Mode::Enforce);
    assert_eq!(c.doc.inbound.len(), 2);
    assert_eq!(c.doc.inbound[0].port, 4242);
    assert_eq!(c.doc.inbound[0].protocol, ProtocolHint::Dicom);
    assert_eq!(
        c.doc.inbound[0].allow,
        [
            Principal::ServiceAccount("radiology/modality".into()),
            Principal::Id(id("spiffe://cluster.local/ns/pacs/sa/viewer")),
        ]
    );
    let o = &c.outcomes["pacs"];
    assert!(o.accepted, "{o:?}");
    assert_eq!(o.reason, Reason::Compiled);
    assert_eq!(o.generation, Some(2));
    assert_eq!(
        c.audit,
        Some(AuditBinding {
            ledger: "audit".into(),
            endpoint: Some("https://audit.radiology.svc:8443".into()),
            delivery: AuditDelivery::Enforce,
            key: SecretKeyRef {
                name: "audit-key".into(),
                key: "key".into()
            },
            archive: None,
        })
    );
    // What the sidecar reads back from the ConfigMap behaves as the policy says, for a pod the
    // policy selects; a pod it does not select gets nothing from it.
    let set: medmesh_core::policy::PolicySet = serde_json::from_str(&c.json().unwrap()).unwrap();
    let selected = set.for_labels(&[("app".to_owned(), "orthanc".to_owned())].into());
    let other = set.for_labels(&[("app".to_owned(), "ohif".to_owned())].into());
    assert!(other.inbound.is_empty(), "{other:?}");
    let p = Policy::new(selected, td()).unwrap();
    let modality = id("spiffe://cluster.local/ns/radiology/sa/modality");
    assert_eq!(p.authorize(4242, &modality), Decision::Allow);
    assert_eq!(p.authorize(8042, &modality), Decision::Deny);
    assert_eq!(
        p.authorize(8042, &id("spiffe://cluster.local/ns/viewers/sa/ohif")),
        Decision::Allow
    );
    assert_eq!(
        p.authorize(11112, &modality),
        Decision::Deny,
        "unlisted port"
    );
}

#[test]
fn invalid_references_refuse_the_policy_with_every_problem() {
    let w = World::new();
    let bad = policy(
        "bad",
        r#"
  podSelector: {matchExpressions: [{key: app, operator: Sometimes}]}
  ports:
  - port: 4242
    allow:
    - spiffeId: spiffe://other.org/ns/a/sa/b
    - spiffeId: not-a-spiffe-id
    - serviceAccount: {namespace: Bad_NS, name: x}
    - namespace: "no spaces"
    - {}
  audit:
    ledgerRef: {name: missing}
    keySecretRef: {name: audit-key, key: other}
"#,
    );
    let policies = [bad, policy("pacs", PACS)];
    let c = compile(&w.snap(&policies));
    let o = &c.outcomes["bad"];
    assert!(!o.accepted);
    assert_eq!(o.reason, Reason::InvalidReference);
    for want in [
        "podSelector: Invalid expression operator",
        "ports[0].allow[0]: spiffeId spiffe://other.org/ns/a/sa/b is outside trust domain cluster.local",
        "ports[0].allow[1]: spiffeId:",
        "ports[0].allow[2]: serviceAccount.namespace \"Bad_NS\"",
        "ports[0].allow[3]: namespace \"no spaces\"",
        "ports[0].allow[4]: exactly one of",
        "audit.ledgerRef: AuditLedger radiology/missing not found",
        "audit.keySecretRef: Secret radiology/audit-key has no key \"other\"",
    ] {
        assert!(o.message.contains(want), "{want:?} not in {}", o.message);
    }
    // The refused policy contributes nothing; the valid one still applies.
    assert!(c.outcomes["pacs"].accepted);
    assert_eq!(c.doc.inbound.len(), 2);
    assert!(
        !c.doc.inbound[0]
            .allow
            .iter()
            .any(|a| matches!(a, Principal::Id(i) if i.trust_domain() == "other.org"))
    );
}

#[test]
fn merges_ports_and_refuses_conflicts_in_name_order() {
    let w = World::new();
    let policies = [
        policy(
            "b-more",
            "  podSelector: {}\n  ports:\n  - port: 4242\n    protocol: dicom\n    allow: [{namespace: teaching}, {serviceAccount: {name: modality}}]\n",
        ),
        policy("a-pacs", PACS),
        policy(
            "c-clash",
            "  podSelector: {}\n  ports:\n  - port: 4242\n    protocol: http\n    allow: [{namespace: x}]\n",
        ),
        policy(
            "d-other-ledger",
            "  podSelector: {}\n  audit:\n    ledgerRef: {name: audit}\n    keySecretRef: {name: audit-key, key: key}\n",
        ),
    ];
    let c = compile(&w.snap(&policies));
    let p4242 = &c.doc.inbound[0];
    assert_eq!(p4242.port, 4242);
    assert_eq!(
        p4242.allow,
        [
            Principal::ServiceAccount("radiology/modality".into()),
            Principal::Id(id("spiffe://cluster.local/ns/pacs/sa/viewer")),
            Principal::Namespace("teaching".into()),
        ],
        "union without duplicates, first policy first"
    );
    let clash = &c.outcomes["c-clash"];
    assert_eq!(clash.reason, Reason::Conflict);
    assert!(
        clash
            .message
            .contains("port 4242 has protocol http here but dicom in policy a-pacs"),
        "{}",
        clash.message
    );
    assert!(!p4242.allow.contains(&Principal::Namespace("x".into())));
    let other = &c.outcomes["d-other-ledger"];
    assert_eq!(other.reason, Reason::Conflict, "{other:?}");
    assert!(
        other
            .message
            .contains("audit settings differ from policy a-pacs")
    );
}

#[test]
fn audit_mode_only_when_every_policy_audits() {
    let w = World::new();
    let audit = policy(
        "trial",
        "  podSelector: {}\n  mode: audit\n  ports:\n  - port: 9000\n",
    );
    let alone = [audit.clone()];
    let c = compile(&w.snap(&alone));
    assert_eq!(c.doc.mode, Mode::Audit);
    assert_eq!(c.outcomes["trial"].reason, Reason::Compiled);

    let mixed = [audit, policy("pacs", PACS)];
    let c = compile(&w.snap(&mixed));
    assert_eq!(c.doc.mode, Mode::Enforce);
    let o = &c.outcomes["trial"];
    assert!(o.accepted);
    assert_eq!(o.reason, Reason::ModeOverridden);
    assert!(o.message.contains("pacs"), "{}", o.message);
}

#[test]
fn compile_for_labels_keeps_only_selected_policies() {
    let w = World::new();
    let policies = [
        policy("pacs", PACS),
        policy(
            "viewer",
            "  podSelector: {matchExpressions: [{key: app, operator: In, values: [ohif]}]}\n  ports:\n  - port: 4242\n    protocol: dicom\n    allow: [{namespace: teaching}]\n  - port: 3000\n    allow: [{namespace: viewers}]\n",
        ),
    ];
    let orthanc = BTreeMap::from([("app".to_owned(), "orthanc".to_owned())]);
    let c = compile_for_labels(&w.snap(&policies), &orthanc);
    let ports: Vec<u16> = c.doc.inbound.iter().map(|p| p.port).collect();
    assert_eq!(ports, [4242, 8042]);
    assert!(
        !c.doc.inbound[0]
            .allow
            .contains(&Principal::Namespace("teaching".into())),
        "the viewer policy does not select orthanc pods"
    );
    assert!(
        c.outcomes["viewer"].accepted,
        "outcomes do not depend on the pod"
    );

    let ohif = BTreeMap::from([("app".to_owned(), "ohif".to_owned())]);
    let c = compile_for_labels(&w.snap(&policies), &ohif);
    let ports: Vec<u16> = c.doc.inbound.iter().map(|p| p.port).collect();
    assert_eq!(ports, [3000, 4242]);
    assert_eq!(
        c.doc.inbound[1].allow,
        [Principal::Namespace("teaching".into())]
    );

    let none = compile_for_labels(&w.snap(&policies), &BTreeMap::new());
    assert!(none.doc.inbound.is_empty(), "nothing selected: deny all");
    assert_eq!(none.doc.mode, Mode::Enforce);
}

#[test]
fn no_policies_deny_everything() {
    let w = World::new();
    let c = compile(&w.snap(&[]));
    assert!(c.doc.inbound.is_empty());
    assert_eq!(c.doc.mode, Mode::Enforce);
    assert!(c.outcomes.is_empty());
    assert!(c.audit.is_none());
}

#[test]
fn outcomes_become_conditions() {
    let w = World::new();
    let policies = [policy(
        "bad",
        "  podSelector: {}\n  ports:\n  - port: 1\n    allow: [{namespace: Nope}]\n",
    )];
    let c = compile(&w.snap(&policies));
    let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap());
    let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap());
    let conds = c.outcomes["bad"].conditions(&[], &t0);
    let get = |cs: &[Condition], t: &str| cs.iter().find(|c| c.type_ == t).cloned().unwrap();
    let ready = get(&conds, "Ready");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "InvalidReference");
    assert!(ready.message.contains("namespace \"Nope\""));
    assert_eq!(ready.observed_generation, Some(2));
    assert_eq!(get(&conds, "Degraded").status, "True");
    assert_eq!(get(&conds, "Progressing").status, "False");
    // Same status later: the transition time stays; a changed status moves it.
    let again = c.outcomes["bad"].conditions(&conds, &t1);
    assert_eq!(get(&again, "Ready").last_transition_time, t0);
    let fixed = Outcome {
        accepted: true,
        reason: Reason::Compiled,
        message: "ok".into(),
        generation: Some(3),
    }
    .conditions(&again, &t1);
    assert_eq!(fixed.len(), 3);
    assert_eq!(get(&fixed, "Ready").status, "True");
    assert_eq!(get(&fixed, "Ready").last_transition_time, t1);
    assert_eq!(get(&fixed, "Degraded").status, "False");
}
