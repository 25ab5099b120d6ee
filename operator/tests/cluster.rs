//! Cluster end-to-end tests: run against whatever `KUBECONFIG` points to, with the operator in
//! this process, out of cluster (the webhook and the identity service registered by URL).
//! They need no nodes: nothing here waits for a Pod to run.
//!
//! ```text
//! KUBECONFIG=... MEDMESH_E2E_HOST=<address the API server can reach this machine at> \
//!   cargo nextest run --workspace -E 'package(medmesh-operator) and binary(cluster)' --run-ignored only
//! ```
//!
//! `MEDMESH_E2E_HOST` defaults to 127.0.0.1 (an API server on this machine); with kind it is
//! the Docker network's gateway (`docker network inspect kind -f '{{(index .IPAM.Config 0).Gateway}}'`).
//! `MEDMESH_E2E_PORT` (default 18443) is the HTTPS port. One operator serves the whole test
//! binary (started once, on its own thread); each test works in its own namespace, removed at
//! the end. Cluster-scoped leftovers: the CRDs (kept) and the webhook configuration
//! `medmesh-e2e-injector` (replaced at each run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use medmesh_operator::crd::{self, AuditLedger, MeshPolicy};
use medmesh_operator::run::{Config, RawConfig};
use serde_json::{Value, json};

const WEBHOOK: &str = "medmesh-e2e-injector";
const OPERATOR_NS: &str = "medmesh-e2e-system";
const WAIT: Duration = Duration::from_secs(60);

fn host() -> String {
    std::env::var("MEDMESH_E2E_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}

fn port() -> u16 {
    std::env::var("MEDMESH_E2E_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(18443)
}

fn base_url() -> String {
    format!("https://{}:{}", host(), port())
}

/// Polls `f` until it returns `Some`, for at most [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Installs the CRDs, the operator's namespace and the webhook configuration, then starts the
/// operator on its own thread (once per test binary). Returns the serving CA bundle.
fn operator() -> &'static str {
    static BUNDLE: OnceLock<String> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
                let client = Client::try_default().await.expect("KUBECONFIG");
                install(&client).await;
                let cfg = Config::check(RawConfig {
                    trust_domain: "cluster.local".into(),
                    namespace: OPERATOR_NS.into(),
                    https_addr: format!("0.0.0.0:{}", port()),
                    admin_addr: "127.0.0.1:0".into(),
                    serving_secret: "medmesh-operator-serving".into(),
                    serving_cert_file: None,
                    serving_key_file: None,
                    ca_secret: "medmesh-identity-ca".into(),
                    webhook_config: WEBHOOK.into(),
                    webhook_service: "medmesh-operator".into(),
                    webhook_url: Some(format!("{}/mutate", base_url())),
                    identity_url: Some(base_url()),
                    sidecar_image: Some("ghcr.io/medmesh/sidecar:e2e".into()),
                    ledger_image: Some("ghcr.io/medmesh/ledger:e2e".into()),
                    native_sidecar: "true".into(),
                    lease_name: "medmesh-e2e".into(),
                    cert_ttl_hours: "24".into(),
                    otlp_endpoint: None,
                })
                .expect("configuration");
                let run = tokio::spawn(medmesh_operator::run::run_until(
                    cfg,
                    std::future::pending(),
                ));
                // The operator writes the caBundle once its serving certificate exists.
                let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
                let bundle = eventually("caBundle", || {
                    let hooks = hooks.clone();
                    async move {
                        let w = hooks.get(WEBHOOK).await.ok()?;
                        let cc = w.webhooks?.into_iter().next()?.client_config;
                        cc.url.as_ref()?;
                        cc.ca_bundle
                            .as_ref()
                            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    }
                })
                .await;
                tx.send(bundle).unwrap();
                let _ = run.await;
            });
        });
        rx.recv_timeout(WAIT * 2).expect("operator start")
    })
}

async fn install(client: &Client) {
    let ssa = PatchParams::apply("medmesh-e2e").force();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for c in crd::all() {
        let name = c.name_any();
        crds.patch(&name, &ssa, &Patch::Apply(&c)).await.unwrap();
        eventually(&format!("CRD {name} established"), || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                let c = crds.get(&name).await.ok()?;
                c.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            OPERATOR_NS,
            &ssa,
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}}),
            ),
        )
        .await
        .unwrap();
    // As the chart renders it out of cluster, without the caBundle the operator writes.
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let _ = hooks.delete(WEBHOOK, &DeleteParams::default()).await;
    let hook: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK},
        "webhooks": [{
            "name": "inject.medmesh.io",
            "clientConfig": {"url": format!("{}/mutate", base_url())},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"medmesh.io/inject": "enabled"}},
            "objectSelector": {"matchExpressions": [{"key": "medmesh.io/inject", "operator": "NotIn", "values": ["disabled"]}]},
            "sideEffects": "NoneOnDryRun",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
        }],
    }))
    .unwrap();
    eventually("webhook configuration created", || {
        let hooks = hooks.clone();
        let hook = hook.clone();
        async move {
            hooks
                .create(&PostParams::default(), &hook)
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
}

/// A fresh namespace for one test, deleted when dropped (in the background).
struct TestNs {
    client: Client,
    name: String,
}

impl TestNs {
    async fn new(prefix: &str, inject: bool) -> Self {
        operator();
        let client = Client::try_default().await.unwrap();
        let name = format!(
            "{prefix}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                % 1_000_000_000
        );
        let mut labels = BTreeMap::new();
        if inject {
            labels.insert("medmesh.io/inject".to_owned(), "enabled".to_owned());
        }
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(labels),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                },
            )
            .await
            .unwrap();
        Self { client, name }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let name = self.name.clone();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = api.delete(&name, &DeleteParams::default()).await;
            });
        }
    }
}

async fn get<K>(api: &Api<K>, name: &str) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(name, || {
        let api = api.clone();
        let name = name.to_owned();
        async move { api.get(&name).await.ok() }
    })
    .await
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn cluster_audit_ledger_yields_its_children_and_a_status() {
    let ns = TestNs::new("e2e-ledger", false).await;
    let ledger: AuditLedger = serde_json::from_value(json!({
        "apiVersion": "medmesh.io/v1alpha1", "kind": "AuditLedger",
        "metadata": {"name": "ledger"},
        "spec": {"replicas": 1, "storage": {"size": "1Gi"}, "signingKey": {"generate": {}}},
    }))
    .unwrap();
    let ledgers: Api<AuditLedger> = ns.api();
    ledgers
        .create(&PostParams::default(), &ledger)
        .await
        .unwrap();

    let key: Secret = get(&ns.api(), "ledger-signing-key").await;
    let tls: Secret = get(&ns.api(), "ledger-tls").await;
    let cm: ConfigMap = get(&ns.api(), "ledger-config").await;
    let headless: Service = get(&ns.api(), "ledger-headless").await;
    let _client: Service = get(&ns.api(), "ledger").await;
    let sts: StatefulSet = get(&ns.api(), "ledger").await;
    let _pdb: PodDisruptionBudget = get(&ns.api(), "ledger").await;
    assert!(
        key.owner_references().is_empty(),
        "the signing key outlives the ledger"
    );
    assert_eq!(tls.owner_references()[0].kind, "AuditLedger");
    assert!(cm.data.unwrap().contains_key("ledger-0.yaml"));
    assert_eq!(headless.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    assert_eq!(
        sts.spec.unwrap().service_name.as_deref(),
        Some("ledger-headless")
    );

    // No node runs the pod: the status says so.
    let status = eventually("ledger status", || {
        let ledgers = ledgers.clone();
        async move {
            ledgers
                .get("ledger")
                .await
                .ok()?
                .status
                .filter(|s| s.endpoint.is_some())
        }
    })
    .await;
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.ready_replicas, Some(0));
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("https://ledger.{}.svc:8443", ns.name).as_str())
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");

    // A second look changes nothing: the key Secret is the one first created.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again: Secret = get(&ns.api(), "ledger-signing-key").await;
    assert_eq!(again.metadata.uid, key.metadata.uid);
    assert_eq!(again.data, key.data);
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn cluster_mesh_policy_yields_the_policy_config_map() {
    let ns = TestNs::new("e2e-policy", false).await;
    let policy: MeshPolicy = serde_json::from_value(json!({
        "apiVersion": "medmesh.io/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": "pacs"},
        "spec": {"podSelector": {}, "ports": [{"port": 4242, "protocol": "dicom", "allow": [{"namespace": "radiology"}]}]},
    }))
    .unwrap();
    let policies: Api<MeshPolicy> = ns.api();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let cm: ConfigMap = get(&ns.api(), "medmesh-policy").await;
    let set: Value = serde_json::from_str(&cm.data.unwrap()["policy.json"]).unwrap();
    assert_eq!(set["selected"][0]["document"]["inbound"][0]["port"], 4242);
    let ca: ConfigMap = get(&ns.api(), "medmesh-identity-ca").await;
    assert_eq!(ca.data.unwrap()["ca.crt"], operator());
    let ready = eventually("policy status", || {
        let policies = policies.clone();
        async move {
            policies
                .get("pacs")
                .await
                .ok()?
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")
        }
    })
    .await;
    assert_eq!(ready.status, "True");
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))
    .unwrap()
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn cluster_pod_in_a_labelled_namespace_is_stored_injected_and_dry_run_causes_nothing() {
    let ns = TestNs::new("e2e-inject", true).await;
    let pods: Api<Pod> = ns.api();
    // The deny-all policy and the CA are published for a labelled namespace without policies.
    let _: ConfigMap = get(&ns.api(), "medmesh-policy").await;
    let created = pods
        .create(&PostParams::default(), &pod("app"))
        .await
        .unwrap();
    let stored = pods.get("app").await.unwrap();
    assert_eq!(stored.metadata.uid, created.metadata.uid);
    let spec = stored.spec.unwrap();
    let inits: Vec<_> = spec
        .init_containers
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(inits, ["medmesh-init", "medmesh-sidecar"]);
    assert!(
        stored
            .metadata
            .annotations
            .unwrap()
            .contains_key("medmesh.io/injected-version")
    );

    // Dry run: the answer is injected, nothing is stored, no Event is emitted.
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let answer = pods.create(&dry, &pod("dry")).await.unwrap();
    assert_eq!(answer.spec.unwrap().init_containers.unwrap().len(), 2);
    assert!(pods.get_opt("dry").await.unwrap().is_none());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    let about_dry = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("dry"))
        .count();
    assert_eq!(about_dry, 0);
}

async fn token_of(ns: &TestNs, sa: &str) -> String {
    let sas: Api<ServiceAccount> = ns.api();
    sas.create(
        &PostParams::default(),
        &ServiceAccount {
            metadata: ObjectMeta {
                name: Some(sa.into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        },
    )
    .await
    .unwrap();
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["medmesh-identity".into()],
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let tr = eventually("token", || {
        let sas = sas.clone();
        let req = req.clone();
        let sa = sa.to_owned();
        async move {
            sas.create_token_request(&sa, &PostParams::default(), &req)
                .await
                .ok()
        }
    })
    .await;
    tr.status.unwrap().token
}

fn csr_for(id: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

async fn ask(csr: &str, token: &str) -> (u16, Value) {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(operator().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(medmesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap();
    let r = http
        .post(format!("{}/v1/certificate", base_url()))
        .json(&json!({"csr": csr, "token": token}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn cluster_projected_token_gets_its_svid_and_another_accounts_token_is_refused() {
    let ns = TestNs::new("e2e-identity", false).await;
    let modality = token_of(&ns, "modality").await;
    let viewer = token_of(&ns, "viewer").await;
    let id = format!("spiffe://cluster.local/ns/{}/sa/modality", ns.name);

    let (status, body) = ask(&csr_for(&id), &modality).await;
    assert_eq!(status, 200, "{body}");
    let leaf = body["certificate"].as_str().unwrap();
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(leaf.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(medmesh_core::tls::spiffe_id_of(&der).unwrap().as_str(), id);

    // The viewer's token cannot get the modality's identity.
    let (status, body) = ask(&csr_for(&id), &viewer).await;
    assert_eq!(status, 403, "{body}");
}
