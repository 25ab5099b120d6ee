//! Serving material decisions (pure) and its Secret and caBundle writes against a mocked API
//! server (`mock_api_*`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};

use super::*;
use crate::controller::mock::{self, status_body};

const SECRET: &str = "/api/v1/namespaces/medmesh-system/secrets/medmesh-operator-serving";
const SECRETS: &str = "/api/v1/namespaces/medmesh-system/secrets";
const WEBHOOK: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/medmesh-sidecar-injector";

fn t(days: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000 + days * 86_400)
}

fn names() -> Vec<String> {
    sans(
        "medmesh-operator",
        "medmesh-system",
        &["https://10.1.2.3:8443/mutate", "https://dev.example:9443"],
    )
}

fn leaf_dns(m: &Material) -> Vec<String> {
    let der = CertificateDer::pem_slice_iter(m.cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    parse(&der).unwrap().dns
}

#[test]
fn sans_cover_the_service_and_the_registered_urls() {
    assert_eq!(
        names(),
        [
            "medmesh-operator",
            "medmesh-operator.medmesh-system",
            "medmesh-operator.medmesh-system.svc",
            "medmesh-operator.medmesh-system.svc.cluster.local",
            "10.1.2.3",
            "dev.example",
        ]
    );
    assert_eq!(url_host("https://[::1]:8443/x").as_deref(), Some("::1"));
}

#[test]
fn a_new_ca_and_leaf_verify_and_name_every_san() {
    let m = build(Decision::NewCa, None, &names(), t(0)).unwrap();
    assert_eq!(leaf_dns(&m), names());
    assert_eq!(decide(Some(&m), &names(), t(0)), Decision::Keep);
    // rustls accepts it, and a client trusting the bundle verifies it for the Service name.
    m.server_config().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(m.bundle_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    use rustls::client::danger::ServerCertVerifier as _;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        medmesh_core::tls::provider(),
    )
    .build()
    .unwrap();
    let leaf = CertificateDer::pem_slice_iter(m.cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let at = rustls_pki_types::UnixTime::since_unix_epoch(
        t(1).duration_since(SystemTime::UNIX_EPOCH).unwrap(),
    );
    for name in ["medmesh-operator.medmesh-system.svc", "10.1.2.3"] {
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &rustls_pki_types::ServerName::try_from(name).unwrap(),
                &[],
                at,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn the_leaf_is_renewed_with_a_third_left_and_when_a_san_is_missing() {
    let m = build(Decision::NewCa, None, &names(), t(0)).unwrap();
    assert_eq!(decide(Some(&m), &names(), t(59)), Decision::Keep);
    assert_eq!(decide(Some(&m), &names(), t(61)), Decision::NewLeaf);
    let mut more = names();
    more.push("other.example".into());
    assert_eq!(decide(Some(&m), &more, t(0)), Decision::NewLeaf);
    // A renewed leaf comes from the same CA: the bundle (and caBundle) does not change.
    let renewed = build(Decision::NewLeaf, Some(&m), &names(), t(61)).unwrap();
    assert_eq!(renewed.bundle_pem, m.bundle_pem);
    assert_eq!(renewed.ca_key_pem, m.ca_key_pem);
    assert_ne!(renewed.cert_pem, m.cert_pem);
    assert_eq!(decide(Some(&renewed), &names(), t(61)), Decision::Keep);
}

#[test]
fn the_ca_is_renewed_with_a_third_left_and_the_old_one_stays_in_the_bundle() {
    let m = build(Decision::NewCa, None, &names(), t(0)).unwrap();
    assert_eq!(decide(Some(&m), &names(), t(250)), Decision::NewCa);
    let rotated = build(Decision::NewCa, Some(&m), &names(), t(250)).unwrap();
    let bundle: Vec<_> = CertificateDer::pem_slice_iter(rotated.bundle_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    assert_eq!(bundle.len(), 2);
    assert_eq!(der_to_pem(&bundle[1]), m.ca_pem().unwrap());
    assert_eq!(decide(Some(&rotated), &names(), t(250)), Decision::Keep);
    // Once the old CA has expired it is dropped at the next rotation.
    let again = build(Decision::NewCa, Some(&rotated), &names(), t(370)).unwrap();
    assert_eq!(
        CertificateDer::pem_slice_iter(again.bundle_pem.as_bytes()).count(),
        2
    );
}

fn secret_json(m: &Material, rv: &str) -> Value {
    let mut v =
        serde_json::to_value(m.to_secret("medmesh-system", "medmesh-operator-serving")).unwrap();
    v["metadata"]["resourceVersion"] = json!(rv);
    v["apiVersion"] = json!("v1");
    v["kind"] = json!("Secret");
    v
}

#[tokio::test]
async fn mock_api_serving_secret_is_created_when_absent() {
    let (client, mut api) = mock::pair();
    let secrets = Api::namespaced(client, "medmesh-system");
    let n = names();
    let (r, created) = mock::run(
        ensure(
            &secrets,
            "medmesh-system",
            "medmesh-operator-serving",
            &n,
            t(0),
        ),
        async {
            api.not_found(SECRET).await;
            let s = api.expect("POST", SECRETS, 201, |s| s.body.clone()).await;
            api.quiet(Duration::from_millis(100)).await;
            s.body
        },
        Duration::from_secs(10),
    )
    .await;
    let (m, wrote) = r.unwrap();
    assert!(wrote);
    assert_eq!(created["type"], "kubernetes.io/tls");
    let stored: Secret = serde_json::from_value(created).unwrap();
    assert_eq!(Material::from_secret(&stored).unwrap(), m);
}

#[tokio::test]
async fn mock_api_valid_serving_secret_is_kept() {
    let (client, mut api) = mock::pair();
    let secrets = Api::namespaced(client, "medmesh-system");
    let m = build(Decision::NewCa, None, &names(), t(0)).unwrap();
    let body = secret_json(&m, "5");
    let n = names();
    let (r, ()) = mock::run(
        ensure(
            &secrets,
            "medmesh-system",
            "medmesh-operator-serving",
            &n,
            t(10),
        ),
        async {
            api.expect("GET", SECRET, 200, |_| body).await;
            api.quiet(Duration::from_millis(100)).await;
        },
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r.unwrap(), (m, false));
}

#[tokio::test]
async fn mock_api_serving_rotation_replaces_with_the_resource_version_and_survives_a_race() {
    let (client, mut api) = mock::pair();
    let secrets = Api::namespaced(client, "medmesh-system");
    let old = build(Decision::NewCa, None, &names(), t(0)).unwrap();
    // Another replica renewed first: our replace conflicts, we re-read theirs and keep it.
    let theirs = build(Decision::NewLeaf, Some(&old), &names(), t(61)).unwrap();
    let (old_body, their_body) = (secret_json(&old, "5"), secret_json(&theirs, "6"));
    let n = names();
    let (r, put) = mock::run(
        ensure(
            &secrets,
            "medmesh-system",
            "medmesh-operator-serving",
            &n,
            t(61),
        ),
        async {
            api.expect("GET", SECRET, 200, |_| old_body).await;
            let put = api
                .expect("PUT", SECRET, 409, |_| status_body(409, "Conflict"))
                .await;
            api.expect("GET", SECRET, 200, |_| their_body).await;
            api.quiet(Duration::from_millis(100)).await;
            put.body
        },
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(put["metadata"]["resourceVersion"], "5");
    assert_eq!(r.unwrap(), (theirs, false));
}

fn webhook_config(ca: Option<&str>, service: bool) -> Value {
    let mut cc = json!({});
    if service {
        cc["service"] =
            json!({"name": "medmesh-operator", "namespace": "medmesh-system", "path": "/mutate"});
    }
    if let Some(ca) = ca {
        use base64::Engine as _;
        cc["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(ca));
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "medmesh-sidecar-injector"},
        "webhooks": [{
            "name": "inject.medmesh.io", "clientConfig": cc,
            "sideEffects": "NoneOnDryRun", "admissionReviewVersions": ["v1"],
        }],
    })
}

#[tokio::test]
async fn mock_api_ca_bundle_is_patched_once() {
    let (client, mut api) = mock::pair();
    let webhooks = Api::all(client);
    let bundle = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let (r, patch) = mock::run(
        patch_webhook(&webhooks, "medmesh-sidecar-injector", bundle, None),
        async {
            api.expect("GET", WEBHOOK, 200, |_| webhook_config(None, true))
                .await;
            api.expect("PATCH", WEBHOOK, 200, |_| {
                webhook_config(Some(bundle), true)
            })
            .await
        },
        Duration::from_secs(10),
    )
    .await;
    assert!(r.unwrap());
    assert!(patch.query.contains("fieldManager=medmesh-operator"));
    use base64::Engine as _;
    assert_eq!(
        patch.body,
        json!({"webhooks": [{"name": "inject.medmesh.io", "clientConfig": {
            "caBundle": base64::engine::general_purpose::STANDARD.encode(bundle)
        }}]})
    );
    // Already up to date: read, nothing written.
    let (r, ()) = mock::run(
        patch_webhook(&webhooks, "medmesh-sidecar-injector", bundle, None),
        async {
            api.expect("GET", WEBHOOK, 200, |_| webhook_config(Some(bundle), true))
                .await;
            api.quiet(Duration::from_millis(100)).await;
        },
        Duration::from_secs(10),
    )
    .await;
    assert!(!r.unwrap());
}

#[tokio::test]
async fn mock_api_out_of_cluster_registers_the_url_instead_of_the_service() {
    let (client, mut api) = mock::pair();
    let webhooks = Api::all(client);
    let bundle = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let (r, patch) = mock::run(
        patch_webhook(
            &webhooks,
            "medmesh-sidecar-injector",
            bundle,
            Some("https://10.1.2.3:8443/mutate"),
        ),
        async {
            api.expect("GET", WEBHOOK, 200, |_| webhook_config(Some(bundle), true))
                .await;
            api.expect("PATCH", WEBHOOK, 200, |_| {
                webhook_config(Some(bundle), false)
            })
            .await
        },
        Duration::from_secs(10),
    )
    .await;
    assert!(r.unwrap());
    let cc = &patch.body["webhooks"][0]["clientConfig"];
    assert_eq!(cc["url"], "https://10.1.2.3:8443/mutate");
    assert_eq!(cc["service"], Value::Null);
}
