//! The per-namespace `MeshPolicy` reconciler against a mocked API server (`mock_api_*`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::*;
use crate::controller::mock::{self, ApiServer};
use crate::events::NoEvents;
use crate::identity::IssuerCa;
use crate::metrics::ReconcileMetrics;

const POLICIES: &str = "/apis/medmesh.io/v1alpha1/namespaces/radiology/meshpolicies";
const CM: &str = "/api/v1/namespaces/radiology/configmaps/medmesh-policy";
const CA_CM: &str = "/api/v1/namespaces/radiology/configmaps/medmesh-identity-ca";
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

fn context(serving_ca: Option<&str>) -> (Arc<Context>, ApiServer) {
    let (client, api) = mock::pair();
    let td = medmesh_core::TrustDomain::new("cluster.local").unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(serving_ca.map(str::to_owned));
    let ctx = Arc::new(Context {
        archive_peers: None,
        client,
        ca: Arc::new(IssuerCa::generate(&td, t0()).unwrap()),
        trust_domain: td,
        ledger_image: "ledger".into(),
        otlp_endpoint: None,
        checkpoints: None,
        reader_id: None,
        serving_ca: rx,
        events: Arc::new(NoEvents),
        metrics: ReconcileMetrics::unregistered(),
        clock: Arc::new(t0),
        resolve: crate::resolve::Resolve::default(),
    });
    (ctx, api)
}

fn namespace(labelled: bool) -> Arc<Namespace> {
    let labels = if labelled {
        json!({"medmesh.io/inject": "enabled"})
    } else {
        json!({})
    };
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "radiology", "labels": labels},
        }))
        .unwrap(),
    )
}

fn policy(name: &str, uid: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "medmesh.io/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": name, "namespace": "radiology", "uid": uid, "generation": 3},
        "spec": spec,
    })
}

fn good() -> Value {
    policy(
        "pacs",
        "u-pacs",
        json!({
            "podSelector": {"matchLabels": {"app": "orthanc"}},
            "ports": [{"port": 4242, "protocol": "dicom", "allow": [{"serviceAccount": {"name": "modality"}}]}],
        }),
    )
}

fn bad() -> Value {
    policy(
        "viewer",
        "u-viewer",
        json!({
            "podSelector": {},
            "ports": [{"port": 8042, "allow": [{"spiffeId": "spiffe://elsewhere.example/ns/a/sa/b"}]}],
        }),
    )
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "medmesh.io/v1alpha1", "kind": "MeshPolicyList", "metadata": {}, "items": items})
}

/// The status patches of a pass, by policy name.
async fn status_patch(api: &mut ApiServer, stored: &Value) -> Value {
    let name = stored["metadata"]["name"].as_str().unwrap().to_owned();
    let mut stored = stored.clone();
    let seen = api
        .expect("PATCH", &format!("{POLICIES}/{name}/status"), 200, |s| {
            let mut v = stored.clone();
            mock::merge(&mut v, &s.body);
            v
        })
        .await;
    // What the API server now stores.
    mock::merge(&mut stored, &seen.body);
    stored
}

fn condition<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == t)
        .unwrap()
}

#[tokio::test]
async fn mock_api_policy_namespace_is_compiled_published_and_statuses_written() {
    let (ctx, mut api) = context(Some(CA_PEM));
    let (r, (cm, ca, pacs, viewer)) = mock::run(
        reconcile(namespace(true), ctx),
        async {
            api.expect("GET", POLICIES, 200, |_| list(vec![good(), bad()]))
                .await;
            let cm = api.apply(CM, json!({})).await.body;
            let ca = api.apply(CA_CM, json!({})).await.body;
            let pacs = status_patch(&mut api, &good()).await;
            let viewer = status_patch(&mut api, &bad()).await;
            api.quiet(Duration::from_millis(100)).await;
            (cm, ca, pacs, viewer)
        },
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r.unwrap(), Action::requeue(RESYNC));

    // The document holds the valid policy only; the ConfigMap is owned by both policies
    // (without a controller), so it goes away with the last of them.
    let set: Value = serde_json::from_str(cm["data"]["policy.json"].as_str().unwrap()).unwrap();
    let selected = set["selected"].as_array().unwrap();
    assert_eq!(selected.len(), 1, "{set}");
    assert_eq!(selected[0]["selector"]["matchLabels"]["app"], "orthanc");
    let doc = &selected[0]["document"];
    assert_eq!(doc["mode"], "enforce");
    assert_eq!(doc["inbound"].as_array().unwrap().len(), 1);
    assert_eq!(doc["inbound"][0]["port"], 4242);
    let owners: Vec<&str> = cm["metadata"]["ownerReferences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            assert!(o.get("controller").is_none());
            assert_eq!(o["kind"], "MeshPolicy");
            o["uid"].as_str().unwrap()
        })
        .collect();
    assert_eq!(owners, ["u-pacs", "u-viewer"]);
    assert_eq!(ca["data"]["ca.crt"], CA_PEM);
    assert_eq!(
        ca["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "medmesh-operator"
    );

    assert_eq!(pacs["status"]["observedGeneration"], 3);
    assert_eq!(condition(&pacs, "Ready")["status"], "True");
    assert_eq!(condition(&viewer, "Ready")["status"], "False");
    assert_eq!(condition(&viewer, "Ready")["reason"], "InvalidReference");
    assert!(
        condition(&viewer, "Ready")["message"]
            .as_str()
            .unwrap()
            .contains("outside trust domain cluster.local"),
        "{viewer}"
    );
    assert_eq!(condition(&viewer, "Degraded")["status"], "True");
}

#[tokio::test]
async fn mock_api_policy_second_pass_writes_no_status() {
    let (ctx, mut api) = context(Some(CA_PEM));
    let (r, first) = mock::run(
        reconcile(namespace(true), ctx.clone()),
        async {
            api.expect("GET", POLICIES, 200, |_| list(vec![good(), bad()]))
                .await;
            let cm = api.apply(CM, json!({})).await.body;
            api.apply(CA_CM, json!({})).await;
            let a = status_patch(&mut api, &good()).await;
            let b = status_patch(&mut api, &bad()).await;
            (cm, a, b)
        },
        Duration::from_secs(10),
    )
    .await;
    r.unwrap();
    let (cm1, stored_a, stored_b) = first;
    let (r, cm2) = mock::run(
        reconcile(namespace(true), ctx),
        async {
            api.expect("GET", POLICIES, 200, move |_| {
                list(vec![stored_a, stored_b])
            })
            .await;
            let cm = api.apply(CM, json!({})).await.body;
            api.apply(CA_CM, json!({})).await;
            api.quiet(Duration::from_millis(200)).await;
            cm
        },
        Duration::from_secs(10),
    )
    .await;
    r.unwrap();
    assert_eq!(cm1, cm2);
}

#[tokio::test]
async fn mock_api_policy_labelled_namespace_without_policies_gets_deny_all() {
    let (ctx, mut api) = context(Some(CA_PEM));
    let (r, cm) = mock::run(
        reconcile(namespace(true), ctx),
        async {
            api.expect("GET", POLICIES, 200, |_| list(vec![])).await;
            let cm = api.apply(CM, json!({})).await.body;
            api.apply(CA_CM, json!({})).await;
            api.quiet(Duration::from_millis(100)).await;
            cm
        },
        Duration::from_secs(10),
    )
    .await;
    r.unwrap();
    let set: PolicySet = serde_json::from_str(cm["data"]["policy.json"].as_str().unwrap()).unwrap();
    assert_eq!(set, PolicySet::default());
    assert!(
        set.for_labels(&BTreeMap::new()).inbound.is_empty(),
        "deny-all: no inbound port"
    );
    // No owner: the garbage collector must not remove what the sidecars need.
    assert_eq!(cm["metadata"]["ownerReferences"], json!([]));
}

#[tokio::test]
async fn mock_api_policy_unmeshed_namespace_gets_nothing() {
    let (ctx, mut api) = context(Some(CA_PEM));
    let (r, ()) = mock::run(
        reconcile(namespace(false), ctx),
        async {
            api.expect("GET", POLICIES, 200, |_| list(vec![])).await;
            api.not_found(CM).await;
            api.quiet(Duration::from_millis(100)).await;
        },
        Duration::from_secs(10),
    )
    .await;
    r.unwrap();
}

#[tokio::test]
async fn mock_api_policy_audit_references_are_checked_against_ledgers_and_secrets() {
    let (ctx, mut api) = context(None);
    let audited = policy(
        "pacs",
        "u-pacs",
        json!({
            "podSelector": {},
            "ports": [{"port": 4242, "protocol": "dicom"}],
            "audit": {"ledgerRef": {"name": "missing"}, "keySecretRef": {"name": "k", "key": "hmac"}},
        }),
    );
    let stored = audited.clone();
    let (r, status) = mock::run(
        reconcile(namespace(false), ctx),
        async {
            api.expect("GET", POLICIES, 200, move |_| list(vec![audited])).await;
            api.expect("GET", "/apis/medmesh.io/v1alpha1/namespaces/radiology/auditledgers", 200, |_| {
                json!({"apiVersion": "medmesh.io/v1alpha1", "kind": "AuditLedgerList", "metadata": {}, "items": []})
            })
            .await;
            api.expect("GET", "/api/v1/namespaces/radiology/secrets", 200, |_| {
                json!({"apiVersion": "v1", "kind": "SecretList", "metadata": {}, "items": [
                    {"metadata": {"name": "k", "namespace": "radiology"}, "data": {"other": "eA=="}}
                ]})
            })
            .await;
            api.apply(CM, json!({})).await;
            // No serving CA known yet: no identity-CA ConfigMap.
            let s = status_patch(&mut api, &stored).await;
            api.quiet(Duration::from_millis(100)).await;
            s
        },
        Duration::from_secs(10),
    )
    .await;
    r.unwrap();
    let msg = condition(&status, "Ready")["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains("AuditLedger radiology/missing not found"),
        "{msg}"
    );
    assert!(
        msg.contains("Secret radiology/k has no key \"hmac\""),
        "{msg}"
    );
}

#[tokio::test]
async fn mock_api_policy_audit_settings_and_key_are_published_for_sidecars() {
    let (ctx, mut api) = context(None);
    let audited = policy(
        "pacs",
        "u-pacs",
        json!({
            "podSelector": {},
            "ports": [{"port": 4242, "protocol": "dicom"}],
            "audit": {"ledgerRef": {"name": "l"}, "delivery": "enforce",
                      "keySecretRef": {"name": "k", "key": "hmac"}},
        }),
    );
    let verifier =
        medmesh_core::checkpoint::NoteSigner::from_seed("cluster.local/radiology/l", [3; 32])
            .unwrap()
            .verifier_key();
    let stored = audited.clone();
    let v2 = verifier.clone();
    let (r, (secret, cm)) = mock::run(
        reconcile(namespace(true), ctx),
        async {
            api.expect("GET", POLICIES, 200, move |_| list(vec![audited]))
                .await;
            ledger_key_and_config(&mut api, v2).await;
            let secret = api
                .apply(
                    "/api/v1/namespaces/radiology/secrets/medmesh-audit-key",
                    json!({}),
                )
                .await;
            let cm = api.apply(CM, json!({})).await;
            status_patch(&mut api, &stored).await;
            api.quiet(Duration::from_millis(100)).await;
            (secret, cm)
        },
        Duration::from_secs(10),
    )
    .await;
    r.unwrap();
    // The key, copied under the name every injected Pod mounts.
    assert_eq!(
        secret.body["data"]["key"],
        "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
    );
    // audit.json is what the sidecar's --audit-config reads.
    let audit: medmesh_core::wire::SidecarAudit =
        serde_json::from_str(cm.body["data"]["audit.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        audit,
        medmesh_core::wire::SidecarAudit {
            ledger_url: "https://l.radiology.svc:8443".into(),
            ledger_id: Some("spiffe://cluster.local/ns/radiology/ledger/l".into()),
            ledger_verifier: verifier,
            ledger_origin: "cluster.local/radiology/l".into(),
            delivery: "enforce".into(),
            key_file: "/etc/medmesh/audit/key".into(),
            archive: None,
        }
    );
    assert!(cm.body["data"]["policy.json"].is_string());
}

#[tokio::test]
async fn mock_api_policy_archive_key_is_made_once_and_published_with_the_archive() {
    let (ctx, mut api) = context(None);
    let break_glass = medmesh_core::seal::ArchiveKey::generate()
        .recipient()
        .to_string();
    let archiving = policy(
        "pacs",
        "u-pacs",
        json!({
            "podSelector": {},
            "ports": [{"port": 4242, "protocol": "dicom"}],
            "audit": {"ledgerRef": {"name": "l"}, "delivery": "enforce",
                      "keySecretRef": {"name": "k", "key": "hmac"},
                      "archive": {"archiveRef": {"name": "pacs-archive"}, "mode": "required",
                                  "breakGlassRecipient": break_glass,
                                  "restorers": [{"kind": "Group", "name": "hospital:restorers",
                                                 "apiGroup": "rbac.authorization.k8s.io"}]}},
        }),
    );
    let verifier =
        medmesh_core::checkpoint::NoteSigner::from_seed("cluster.local/radiology/l", [3; 32])
            .unwrap()
            .verifier_key();
    let stored = archiving.clone();
    let (r, (key, role, binding, cm)) = mock::run(
        reconcile(namespace(true), ctx),
        async {
            api.expect("GET", POLICIES, 200, move |_| list(vec![archiving])).await;
            ledger_key_and_config(&mut api, verifier).await;
            api.expect("GET", "/apis/medmesh.io/v1alpha1/namespaces/radiology/imagearchives/pacs-archive", 200, |_| {
                json!({"apiVersion": "medmesh.io/v1alpha1", "kind": "ImageArchive",
                       "metadata": {"name": "pacs-archive", "namespace": "radiology"},
                       "spec": {"replicas": 3, "replication": {"min": 2, "max": 3},
                                "storage": {"kuboSize": "10Gi", "clusterSize": "1Gi"}},
                       "status": {"endpoint": "http://pacs-archive.radiology.svc:9094"}})
            })
            .await;
            // No key yet: one is generated and created (never applied, so never replaced).
            api.not_found("/api/v1/namespaces/radiology/secrets/medmesh-archive-key").await;
            let key = api
                .expect("POST", "/api/v1/namespaces/radiology/secrets", 201, |s| s.body.clone())
                .await;
            let role = api
                .apply("/apis/rbac.authorization.k8s.io/v1/namespaces/radiology/roles/medmesh-archive-restorer", json!({}))
                .await;
            let binding = api
                .apply("/apis/rbac.authorization.k8s.io/v1/namespaces/radiology/rolebindings/medmesh-archive-restorer", json!({}))
                .await;
            api.apply("/api/v1/namespaces/radiology/secrets/medmesh-audit-key", json!({}))
                .await;
            let cm = api.apply(CM, json!({})).await;
            status_patch(&mut api, &stored).await;
            api.quiet(Duration::from_millis(100)).await;
            (key, role, binding, cm)
        },
        Duration::from_secs(10),
    )
    .await;
    r.unwrap();
    // The key pair: the identity for restorers, the recipient for sidecars; owned by nobody.
    let data = &key.body["stringData"];
    let identity: medmesh_core::seal::ArchiveKey =
        data["identity"].as_str().unwrap().parse().unwrap();
    let recipient = identity.recipient().to_string();
    assert_eq!(data["recipient"], recipient);
    assert!(key.body["metadata"]["ownerReferences"].is_null());
    // Restorers may get that one Secret, nothing else.
    assert_eq!(
        role.body["rules"],
        json!([{"apiGroups": [""], "resources": ["secrets"],
                "resourceNames": ["medmesh-archive-key"], "verbs": ["get"]}])
    );
    assert_eq!(binding.body["subjects"][0]["name"], "hospital:restorers");
    assert_eq!(binding.body["roleRef"]["name"], "medmesh-archive-restorer");
    // The sidecars' settings: the archive's endpoint and identity, both recipients, the mode
    // and the archive's replication.
    let audit: medmesh_core::wire::SidecarAudit =
        serde_json::from_str(cm.body["data"]["audit.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        audit.archive,
        Some(medmesh_core::wire::SidecarArchive {
            url: "http://pacs-archive.radiology.svc:9094".into(),
            id: "spiffe://cluster.local/ns/radiology/sa/pacs-archive".into(),
            recipients: vec![recipient, break_glass],
            mode: "required".into(),
            replication_min: 2,
            replication_max: 3,
        })
    );
    // Nothing secret in the ConfigMap.
    assert!(!cm.body.to_string().contains("AGE-SECRET-KEY"));
}

/// The reads of an audited namespace after its policies: the ledger `l` (up), the Secret `k`
/// with key `hmac`, and the ledger's published ConfigMap with `verifier`.
async fn ledger_key_and_config(api: &mut ApiServer, verifier: String) {
    api.expect("GET", "/apis/medmesh.io/v1alpha1/namespaces/radiology/auditledgers", 200, |_| {
        json!({"apiVersion": "medmesh.io/v1alpha1", "kind": "AuditLedgerList", "metadata": {}, "items": [
            {"apiVersion": "medmesh.io/v1alpha1", "kind": "AuditLedger",
             "metadata": {"name": "l", "namespace": "radiology"},
             "spec": {"replicas": 1, "storage": {"size": "1Gi"}, "signingKey": {"generate": {}}},
             "status": {"endpoint": "https://l.radiology.svc:8443"}}
        ]})
    })
    .await;
    api.expect("GET", "/api/v1/namespaces/radiology/secrets", 200, |_| {
        json!({"apiVersion": "v1", "kind": "SecretList", "metadata": {}, "items": [
            {"metadata": {"name": "k", "namespace": "radiology"},
             "data": {"hmac": "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="}}
        ]})
    })
    .await;
    api.expect(
        "GET",
        "/api/v1/namespaces/radiology/configmaps/l-config",
        200,
        move |_| {
            json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "l-config", "namespace": "radiology"},
               "data": {"origin": "cluster.local/radiology/l", "verifier.key": verifier}})
        },
    )
    .await;
}
