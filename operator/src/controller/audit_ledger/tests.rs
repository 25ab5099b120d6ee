//! The `AuditLedger` reconciler against a mocked API server (`mock_api_*`), and its pure parts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::*;
use crate::controller::mock::{self, ApiServer};
use crate::events::EventSink;
use crate::metrics::ReconcileMetrics;

const NS: &str = "audit";
const BASE: &str = "/api/v1/namespaces/audit";
const STS: &str = "/apis/apps/v1/namespaces/audit/statefulsets/ledger";
const PDB: &str = "/apis/policy/v1/namespaces/audit/poddisruptionbudgets/ledger";
const STATUS: &str = "/apis/medmesh.io/v1alpha1/namespaces/audit/auditledgers/ledger/status";
const UID: &str = "6a3c1f0e-1d2b-4c5d-8e9f-000000000001";

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

fn ledger(spec: Value) -> AuditLedger {
    serde_json::from_value(json!({
        "apiVersion": "medmesh.io/v1alpha1",
        "kind": "AuditLedger",
        "metadata": {"name": "ledger", "namespace": NS, "uid": UID, "generation": 1},
        "spec": spec,
    }))
    .unwrap()
}

fn generated() -> AuditLedger {
    ledger(json!({
        "replicas": 1,
        "storage": {"size": "5Gi", "storageClassName": "fast"},
        "signingKey": {"generate": {}},
        "appenders": [{"serviceAccount": {"name": "orthanc", "namespace": "pacs"}}],
        "readers": [{"spiffeId": "spiffe://cluster.local/ns/audit/sa/auditor"}],
        "image": "registry.example/ledger:1",
    }))
}

#[derive(Default)]
struct Events(Mutex<Vec<InjectionEvent>>);

impl EventSink for Events {
    fn emit(&self, event: InjectionEvent) {
        self.0.lock().unwrap().push(event);
    }
}

struct FixedReader(Mutex<Vec<LedgerTarget>>);

impl CheckpointReader for FixedReader {
    fn read<'a>(
        &'a self,
        target: &'a LedgerTarget,
    ) -> Pin<Box<dyn Future<Output = Result<LedgerCheckpoint, String>> + Send + 'a>> {
        self.0.lock().unwrap().push(target.clone());
        Box::pin(async {
            Ok(LedgerCheckpoint {
                status: None,
                tree_size: 42,
                root_hash: "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
            })
        })
    }
}

struct Fixture {
    ctx: Arc<Context>,
    events: Arc<Events>,
    reader: Arc<FixedReader>,
    api: ApiServer,
}

fn fixture(ca: Arc<IssuerCa>, with_reader: bool) -> Fixture {
    let (client, api) = mock::pair();
    let events = Arc::new(Events::default());
    let reader = Arc::new(FixedReader(Mutex::new(Vec::new())));
    let (_tx, serving_ca) = tokio::sync::watch::channel(None);
    let ctx = Arc::new(Context {
        archive_peers: None,
        client,
        trust_domain: td(),
        ledger_image: "ghcr.io/medmesh/ledger:test".into(),
        otlp_endpoint: None,
        ca,
        checkpoints: with_reader.then(|| reader.clone() as Arc<dyn CheckpointReader>),
        reader_id: Some(
            "spiffe://cluster.local/ns/medmesh-system/sa/medmesh-operator"
                .parse()
                .unwrap(),
        ),
        serving_ca,
        events: events.clone(),
        metrics: ReconcileMetrics::unregistered(),
        clock: Arc::new(t0),
        resolve: crate::resolve::Resolve::default(),
    });
    Fixture {
        ctx,
        events,
        reader,
        api,
    }
}

fn ca() -> Arc<IssuerCa> {
    Arc::new(IssuerCa::generate(&td(), t0() - Duration::from_secs(3600)).unwrap())
}

fn owned_by_ledger(obj: &Value) {
    let refs = obj["metadata"]["ownerReferences"].as_array().unwrap();
    assert_eq!(refs.len(), 1, "{obj}");
    let r = &refs[0];
    assert_eq!(r["kind"], "AuditLedger");
    assert_eq!(r["apiVersion"], "medmesh.io/v1alpha1");
    assert_eq!(r["name"], "ledger");
    assert_eq!(r["uid"], UID);
    // The controlling owner: the garbage collector deletes the child after its ledger. No
    // blockOwnerDeletion: setting it needs `update` on auditledgers/finalizers, which the
    // operator's RBAC does not grant (OwnerReferencesPermissionEnforcement).
    assert_eq!(r["controller"], true);
    assert!(r.get("blockOwnerDeletion").is_none());
}

/// What the first pass sent, for the second pass to compare with.
struct FirstPass {
    signing_secret: Value,
    tls_secret: Value,
    applied: Vec<(String, Value)>,
    status: Value,
}

async fn first_pass_scenario(api: &mut ApiServer) -> FirstPass {
    api.not_found(&format!("{BASE}/secrets/ledger-signing-key"))
        .await;
    let created = api
        .expect("POST", &format!("{BASE}/secrets"), 201, |s| {
            let mut v = s.body.clone();
            mock::merge(
                &mut v,
                &json!({"metadata": {"uid": "s1", "resourceVersion": "1"}}),
            );
            v
        })
        .await;
    api.not_found(&format!("{BASE}/secrets/ledger-tls")).await;
    let tls = api
        .apply(&format!("{BASE}/secrets/ledger-tls"), json!({}))
        .await;
    let mut applied = Vec::new();
    for path in [
        format!("{BASE}/configmaps/ledger-config"),
        format!("{BASE}/services/ledger-headless"),
        format!("{BASE}/services/ledger"),
    ] {
        let s = api.apply(&path, json!({})).await;
        applied.push((path, s.body));
    }
    let sts = api
        .apply(STS, json!({"status": {"replicas": 1, "readyReplicas": 1}}))
        .await;
    applied.push((STS.to_owned(), sts.body));
    let pdb = api.apply(PDB, json!({})).await;
    applied.push((PDB.to_owned(), pdb.body));
    let status = api.expect("PATCH", STATUS, 200, echo_status).await;
    FirstPass {
        signing_secret: created.body,
        tls_secret: tls.body,
        applied,
        status: status.body,
    }
}

#[tokio::test]
async fn mock_api_ledger_first_pass_creates_every_child_and_the_status() {
    let mut f = fixture(ca(), true);
    let l = Arc::new(generated());
    let (r, first) = mock::run(
        reconcile(l, f.ctx.clone()),
        async {
            let first = first_pass_scenario(&mut f.api).await;
            f.api.quiet(Duration::from_millis(100)).await;
            first
        },
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r.unwrap(), Action::requeue(RESYNC));

    // The signing key: created (not applied), once, with no owner, holding a key whose name
    // is the log origin.
    let s = &first.signing_secret;
    assert_eq!(s["metadata"]["name"], "ledger-signing-key");
    assert!(s["metadata"].get("ownerReferences").is_none(), "{s}");
    assert_eq!(s["immutable"], true);
    let secret: Secret = serde_json::from_value(s.clone()).unwrap();
    let signer = signer_from_secret(&secret, SIGNING_KEY).unwrap();
    assert_eq!(signer.name(), "cluster.local/audit/ledger");
    assert_eq!(
        secret.data.as_ref().unwrap()[VERIFIER_KEY].0,
        signer.verifier_key().into_bytes()
    );
    let events = f.events.0.lock().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, "SigningKeyGenerated");
    assert_eq!(events[0].regarding.uid.as_deref(), Some(UID));

    // The server certificate: the ledger's SPIFFE ID from the identity CA.
    let tls: Secret = serde_json::from_value(first.tls_secret.clone()).unwrap();
    owned_by_ledger(&first.tls_secret);
    let id: SpiffeId = "spiffe://cluster.local/ns/audit/ledger/ledger"
        .parse()
        .unwrap();
    assert!(tls_is_current(&tls, &id, f.ctx.ca.bundle_pem(), t0()));

    let by_path = |p: &str| {
        &first
            .applied
            .iter()
            .find(|(path, _)| path.ends_with(p))
            .unwrap()
            .1
    };
    for (_, obj) in &first.applied {
        owned_by_ledger(obj);
        assert_eq!(
            obj["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "medmesh-operator"
        );
    }

    // The configuration the ledger reads: one file per replica, no peers, the operator
    // among the readers so it can read checkpoints.
    let cm = by_path("configmaps/ledger-config");
    assert_eq!(cm["data"]["origin"], "cluster.local/audit/ledger");
    assert_eq!(cm["data"][VERIFIER_KEY], signer.verifier_key());
    let file: Value =
        serde_saphyr::from_str(cm["data"]["ledger-0.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(
        file,
        json!({
            "node_id": "ledger-0",
            "peers": [],
            "origin": "cluster.local/audit/ledger",
            "data_dir": "/var/lib/medmesh/ledger",
            "listen": "0.0.0.0:8443",
            "admin_listen": "0.0.0.0:9090",
            "trust_domain": "cluster.local",
            "cert": "/etc/medmesh/tls/tls.crt",
            "key": "/etc/medmesh/tls/tls.key",
            "trust_bundle": "/etc/medmesh/tls/ca.crt",
            "signing_key": "/etc/medmesh/signing/signing.key",
            "appenders": ["spiffe://cluster.local/ns/pacs/sa/orthanc"],
            "readers": [
                "spiffe://cluster.local/ns/audit/sa/auditor",
                "spiffe://cluster.local/ns/medmesh-system/sa/medmesh-operator"
            ],
        })
    );

    let headless = by_path("services/ledger-headless");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    let svc = by_path("services/ledger");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8443);
    assert_eq!(
        svc["spec"]["selector"],
        json!({"app.kubernetes.io/name": "medmesh-ledger", "app.kubernetes.io/instance": "ledger"}),
        "every replica serves clients (followers forward appends to the leader)"
    );

    let sts = by_path("statefulsets/ledger");
    assert_eq!(sts["spec"]["replicas"], 1);
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(sts["spec"]["serviceName"], "ledger-headless");
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "5Gi");
    assert_eq!(claim["spec"]["storageClassName"], "fast");
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(
        pod["topologySpreadConstraints"][0]["topologyKey"],
        "kubernetes.io/hostname"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.example/ledger:1");
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/ready", "port": "admin"})
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/live", "port": "admin"})
    );
    assert_eq!(
        c["ports"][1],
        json!({"name": "admin", "containerPort": 9090, "protocol": "TCP"})
    );
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["env"][1]["value"], "/etc/medmesh/ledger/$(POD_NAME).yaml");
    assert_eq!(
        c["env"][2],
        json!({"name": "MIMALLOC_ALLOW_THP", "value": "0"})
    );
    let pdb = by_path("poddisruptionbudgets/ledger");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // The status: ready replicas from the StatefulSet, the endpoint, the checkpoint read
    // from the ledger's Service as its server identity.
    let st = &first.status["status"];
    assert_eq!(st["observedGeneration"], 1);
    assert_eq!(st["readyReplicas"], 1);
    assert_eq!(st["endpoint"], "https://ledger.audit.svc:8443");
    assert_eq!(st["checkpoint"]["treeSize"], 42);
    assert_eq!(st["checkpoint"]["time"], "2025-06-15T15:06:40Z");
    let cond = |t: &str| {
        st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .unwrap()
            .clone()
    };
    assert_eq!(cond("Ready")["status"], "True");
    assert_eq!(cond("Progressing")["status"], "False");
    assert_eq!(cond("Degraded")["status"], "False");
    let targets = f.reader.0.lock().unwrap();
    assert_eq!(targets[0].url, "https://ledger.audit.svc:8443");
    assert_eq!(targets[0].server_id, id);
}

#[tokio::test]
async fn mock_api_ledger_second_pass_changes_nothing_and_keeps_the_key() {
    let ca = ca();
    let mut f = fixture(ca.clone(), true);
    let (r, first) = mock::run(
        reconcile(Arc::new(generated()), f.ctx.clone()),
        first_pass_scenario(&mut f.api),
        Duration::from_secs(10),
    )
    .await;
    r.unwrap();

    // The stored ledger now carries the status written; the Secrets exist.
    let mut stored = generated();
    stored.status = Some(serde_json::from_value(first.status["status"].clone()).unwrap());
    let mut f2 = fixture(ca, true);
    let signing = first.signing_secret.clone();
    let tls = first.tls_secret.clone();
    let (r, applied) = mock::run(
        reconcile(Arc::new(stored), f2.ctx.clone()),
        async {
            let api = &mut f2.api;
            api.expect(
                "GET",
                &format!("{BASE}/secrets/ledger-signing-key"),
                200,
                |_| signing,
            )
            .await;
            // Present and current: neither regenerated nor re-issued.
            api.expect("GET", &format!("{BASE}/secrets/ledger-tls"), 200, |_| tls)
                .await;
            let mut applied = Vec::new();
            for (path, _) in &first.applied {
                let extra = if path == STS {
                    json!({"status": {"replicas": 1, "readyReplicas": 1}})
                } else {
                    json!({})
                };
                applied.push((path.clone(), api.apply(path, extra).await.body));
            }
            // No status patch: nothing changed.
            api.quiet(Duration::from_millis(200)).await;
            applied
        },
        Duration::from_secs(10),
    )
    .await;
    r.unwrap();
    assert_eq!(
        applied, first.applied,
        "the second pass applies the same objects"
    );
    assert!(f2.events.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn mock_api_ledger_with_missing_secret_ref_is_degraded_and_creates_nothing() {
    let mut f = fixture(ca(), true);
    let l = ledger(json!({
        "storage": {"size": "1Gi"},
        "signingKey": {"secretRef": {"name": "mine", "key": "ed25519"}},
    }));
    let (r, status) = mock::run(
        reconcile(Arc::new(l), f.ctx.clone()),
        async {
            f.api.not_found(&format!("{BASE}/secrets/mine")).await;
            let s = f.api.expect("PATCH", STATUS, 200, echo_status).await;
            f.api.quiet(Duration::from_millis(100)).await;
            s.body
        },
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r.unwrap(), Action::requeue(crate::controller::RETRY));
    let conds = status["status"]["conditions"].as_array().unwrap();
    let degraded = conds.iter().find(|c| c["type"] == "Degraded").unwrap();
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "SigningKeyInvalid");
    assert_eq!(degraded["message"], "Secret audit/mine not found");
}

#[tokio::test]
async fn mock_api_ledger_secret_ref_key_is_used_and_never_written() {
    let mut f = fixture(ca(), false);
    let l = ledger(json!({
        "replicas": 3,
        "storage": {"size": "1Gi"},
        "signingKey": {"secretRef": {"name": "mine", "key": "ed25519"}},
    }));
    let signer = NoteSigner::from_seed("hospital.example/log", [7; 32]).unwrap();
    let user_secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "mine", "namespace": NS},
        "data": {"ed25519": base64_of(&signer.private_key())},
    });
    let (r, (cm, sts, status)) = mock::run(
        reconcile(Arc::new(l), f.ctx.clone()),
        async {
            let api = &mut f.api;
            api.expect("GET", &format!("{BASE}/secrets/mine"), 200, |_| user_secret)
                .await;
            api.not_found(&format!("{BASE}/secrets/ledger-tls")).await;
            api.apply(&format!("{BASE}/secrets/ledger-tls"), json!({}))
                .await;
            let cm = api
                .apply(&format!("{BASE}/configmaps/ledger-config"), json!({}))
                .await;
            api.apply(&format!("{BASE}/services/ledger-headless"), json!({}))
                .await;
            api.apply(&format!("{BASE}/services/ledger"), json!({}))
                .await;
            let sts = api
                .apply(STS, json!({"status": {"readyReplicas": 2}}))
                .await;
            api.apply(PDB, json!({})).await;
            let status = api.expect("PATCH", STATUS, 200, echo_status).await;
            api.quiet(Duration::from_millis(100)).await;
            (cm.body, sts.body, status.body)
        },
        Duration::from_secs(10),
    )
    .await;
    // No checkpoint could be read: looked at again soon, not at the resync.
    assert_eq!(r.unwrap(), Action::requeue(RECHECK));
    assert_eq!(cm["data"]["origin"], "hospital.example/log");
    assert_eq!(cm["data"][VERIFIER_KEY], signer.verifier_key());
    for i in 0..3 {
        assert!(cm["data"].get(format!("ledger-{i}.yaml")).is_some());
    }
    let vol = &sts["spec"]["template"]["spec"]["volumes"][1]["secret"];
    assert_eq!(vol["secretName"], "mine");
    assert_eq!(
        vol["items"][0],
        json!({"key": "ed25519", "path": "signing.key", "mode": 0o400})
    );
    // Without reader credentials the operator is not added to the readers, and says why the
    // checkpoint is missing.
    let file: Value =
        serde_saphyr::from_str(cm["data"]["ledger-0.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(file["readers"], json!([]));
    let st = &status["status"];
    assert_eq!(st["readyReplicas"], 2);
    assert!(st.get("checkpoint").is_none());
    let ready = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "False");
    assert_eq!(
        ready["message"],
        "2/3 replicas ready; checkpoint not read: no reader credentials configured"
    );
}

#[tokio::test]
async fn mock_api_ledger_create_race_uses_the_stored_key() {
    let mut f = fixture(ca(), false);
    let theirs = NoteSigner::from_seed("cluster.local/audit/ledger", [9; 32]).unwrap();
    let stored = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "ledger-signing-key", "namespace": NS},
        "data": {"signing.key": base64_of(&theirs.private_key())},
    });
    let (r, cm) = mock::run(
        reconcile(Arc::new(generated()), f.ctx.clone()),
        async {
            let api = &mut f.api;
            api.not_found(&format!("{BASE}/secrets/ledger-signing-key"))
                .await;
            api.expect("POST", &format!("{BASE}/secrets"), 409, |_| {
                mock::status_body(409, "AlreadyExists")
            })
            .await;
            api.expect(
                "GET",
                &format!("{BASE}/secrets/ledger-signing-key"),
                200,
                |_| stored,
            )
            .await;
            api.not_found(&format!("{BASE}/secrets/ledger-tls")).await;
            api.apply(&format!("{BASE}/secrets/ledger-tls"), json!({}))
                .await;
            let cm = api
                .apply(&format!("{BASE}/configmaps/ledger-config"), json!({}))
                .await;
            api.apply(&format!("{BASE}/services/ledger-headless"), json!({}))
                .await;
            api.apply(&format!("{BASE}/services/ledger"), json!({}))
                .await;
            api.apply(STS, json!({})).await;
            api.apply(PDB, json!({})).await;
            api.expect("PATCH", STATUS, 200, echo_status).await;
            cm.body
        },
        Duration::from_secs(10),
    )
    .await;
    r.unwrap();
    assert_eq!(cm["data"][VERIFIER_KEY], theirs.verifier_key());
    assert!(
        f.events.0.lock().unwrap().is_empty(),
        "no key was generated by us"
    );
}

/// The API server's answer to a status patch: the stored object with the new status.
fn echo_status(s: &mock::Seen) -> Value {
    let mut v = serde_json::to_value(generated()).unwrap();
    mock::merge(&mut v, &s.body);
    v
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn tls_is_renewed_at_half_life_and_when_the_ca_changes() {
    let ca = ca();
    let names = Names::of(&generated()).unwrap();
    let id = names.server_id(&td()).unwrap();
    let owner = generated().controller_owner_ref(&()).unwrap();
    let (chain, key) = issue_svid(&ca, &id, TLS_TTL, t0()).unwrap();
    let s = tls_secret(&names, &owner, &chain, &key, ca.bundle_pem());
    assert!(tls_is_current(&s, &id, ca.bundle_pem(), t0()));
    assert!(tls_is_current(
        &s,
        &id,
        ca.bundle_pem(),
        t0() + TLS_TTL / 2 - Duration::from_secs(600)
    ));
    assert!(!tls_is_current(
        &s,
        &id,
        ca.bundle_pem(),
        t0() + TLS_TTL / 2 + Duration::from_secs(1)
    ));
    let other = IssuerCa::generate(&td(), t0()).unwrap();
    assert!(!tls_is_current(&s, &id, other.bundle_pem(), t0()));
    let other_id: SpiffeId = "spiffe://cluster.local/ns/audit/ledger/other"
        .parse()
        .unwrap();
    assert!(!tls_is_current(&s, &other_id, ca.bundle_pem(), t0()));
}

#[test]
fn checkpoint_time_only_moves_when_the_checkpoint_does() {
    let names = Names::of(&generated()).unwrap();
    let t1 = k8s_time(t0());
    let t2 = k8s_time(t0() + Duration::from_secs(60));
    let cp = |n: u64| LedgerCheckpoint {
        status: None,
        tree_size: n,
        root_hash: format!("root{n}"),
    };
    let obs = |c: Result<LedgerCheckpoint, String>| Observed {
        ready_replicas: 1,
        key_problem: None,
        checkpoint: c,
    };
    let mut l = generated();
    let s1 = status(&l, &names, &obs(Ok(cp(1))), &t1);
    l.status = Some(s1.clone());
    let same = status(&l, &names, &obs(Ok(cp(1))), &t2);
    assert_eq!(same, s1, "nothing changed, nothing to write");
    let grown = status(&l, &names, &obs(Ok(cp(2))), &t2);
    assert_eq!(grown.checkpoint.as_ref().unwrap().time, t2);
    // A failed read keeps the last checkpoint and degrades a ready ledger.
    let failed = status(&l, &names, &obs(Err("connection refused".into())), &t2);
    assert_eq!(failed.checkpoint, s1.checkpoint);
    let d = failed
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", "CheckpointUnreadable")
    );
    assert_eq!(d.message, "checkpoint not read: connection refused");
    // The Ready condition, unchanged in status, keeps its transition time.
    let r = failed
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(r.last_transition_time, t1);
}

#[test]
fn three_replicas_list_each_other_as_raft_peers() {
    let mut l = generated();
    l.spec.replicas = 3;
    let names = Names::of(&l).unwrap();
    let owner = l.controller_owner_ref(&()).unwrap();
    let signer = NoteSigner::from_seed("cluster.local/audit/ledger", [7; 32]).unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let cm = config_map(&l, &names, &owner, &td, &signer, None).unwrap();
    let data = cm.data.unwrap();
    let want = json!([
        "ledger-0.ledger-headless.audit.svc:8443",
        "ledger-1.ledger-headless.audit.svc:8443",
        "ledger-2.ledger-headless.audit.svc:8443"
    ]);
    for i in 0..3 {
        let file: Value =
            serde_saphyr::from_str(data[&format!("ledger-{i}.yaml")].as_str()).unwrap();
        assert_eq!(file["node_id"], format!("ledger-{i}"));
        assert_eq!(file["peers"], want, "replica {i}");
    }
}

#[test]
fn ledgers_trace_only_where_the_operator_is_told_to() {
    let l = generated();
    let names = Names::of(&l).unwrap();
    let owner = l.controller_owner_ref(&()).unwrap();
    let env_of = |otlp: Option<&str>| {
        let sts = stateful_set(&l, &names, &owner, "ledger:test", otlp);
        sts.spec.unwrap().template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .find(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT")
            .and_then(|e| e.value)
    };
    assert_eq!(env_of(None), None);
    assert_eq!(
        env_of(Some("http://collector:4318")).as_deref(),
        Some("http://collector:4318")
    );
}

#[test]
fn status_reports_the_raft_leader_term_and_follower_lag() {
    let mut l = generated();
    l.spec.replicas = 3;
    let names = Names::of(&l).unwrap();
    let view = medmesh_core::wire::LedgerStatus {
        replicated: true,
        id: Some(1),
        state: Some("Leader".into()),
        leader: Some(1),
        term: Some(4),
        last_log_index: Some(120),
        applied_index: Some(118),
        followers: vec![
            medmesh_core::wire::FollowerStatus {
                id: 0,
                matched: 120,
                lag: 0,
            },
            medmesh_core::wire::FollowerStatus {
                id: 2,
                matched: 100,
                lag: 20,
            },
        ],
        ready: true,
        tree_size: 5000,
        checkpoint_size: Some(4990),
        ..Default::default()
    };
    let obs = Observed {
        ready_replicas: 3,
        key_problem: None,
        checkpoint: Ok(LedgerCheckpoint {
            tree_size: 4990,
            root_hash: "ROOT".into(),
            status: Some(view),
        }),
    };
    let now = k8s_time(t0());
    let st = status(&l, &names, &obs, &now);
    let r = st.replication.clone().unwrap();
    assert_eq!(r.leader.as_deref(), Some("ledger-1"));
    assert_eq!((r.term, r.applied_index), (Some(4), Some(118)));
    assert_eq!(r.observed_from.as_deref(), Some("ledger-1"));
    assert_eq!(
        r.followers,
        vec![
            FollowerLag {
                replica: "ledger-0".into(),
                lag: 0
            },
            FollowerLag {
                replica: "ledger-2".into(),
                lag: 20
            }
        ]
    );
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(
        ready.message.contains("Raft leader ledger-1"),
        "{}",
        ready.message
    );
    // A failed read keeps the last view.
    l.status = Some(st);
    let failed = Observed {
        checkpoint: Err("connection refused".into()),
        ..obs
    };
    assert_eq!(status(&l, &names, &failed, &now).replication, Some(r));
}
