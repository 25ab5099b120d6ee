//! The HTTPS listener in process with real TLS: TLS 1.3 only, the webhook and the identity
//! service behind it, the admin endpoints, and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use medmesh_core::TrustDomain;
use medmesh_core::devca::{DevCa, LeafOptions};
use medmesh_operator::events::NoEvents;
use medmesh_operator::identity::{IdentityService, IssuerCa, RecordedReviewer};
use medmesh_operator::metrics::Metrics;
use medmesh_operator::run::{self, Admin};
use medmesh_operator::webhook::{InjectConfig, WebhookState};
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn roots(ca_pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

#[tokio::test]
async fn serves_webhook_and_identity_over_tls13_only_and_drains() {
    let td = TrustDomain::new("cluster.local").unwrap();
    let dev = DevCa::new(&td, 1).unwrap();
    let serving = dev
        .issue(
            &td.workload("medmesh-system", "medmesh-operator").unwrap(),
            &LeafOptions {
                dns: vec!["localhost".into()],
                ..LeafOptions::default()
            },
        )
        .unwrap();
    let tls = run::server_tls(serving.cert_pem.as_bytes(), serving.key_pem.as_bytes()).unwrap();
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).unwrap();
    let webhook = WebhookState {
        config: Arc::new(InjectConfig {
            sidecar_image: "sidecar:1".into(),
            image_pull_policy: None,
            trust_domain: td.clone(),
            identity_url: "https://localhost".into(),
            version: "1".into(),
            native_sidecar: true,
            otlp_endpoint: None,
        }),
        events: Arc::new(NoEvents),
        metrics: metrics.clone(),
    };
    let identity = Arc::new(IdentityService {
        ca: Arc::new(IssuerCa::generate(&td, SystemTime::now()).unwrap()),
        reviewer: RecordedReviewer::default(),
        trust_domain: td.clone(),
        ttl: Duration::from_secs(3600),
        metrics: metrics.clone(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_tls_tx, tls_rx) = watch::channel(tls);
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(run::serve_https(
        listener,
        tls_rx,
        run::https_router(webhook, identity.clone()),
        stop_rx,
        Duration::from_secs(2),
    ));

    let client_tls = rustls::ClientConfig::builder_with_provider(medmesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&dev.ca().cert_pem))
        .with_no_client_auth();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(client_tls)
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", addr.port());

    let res = client
        .post(format!("{base}/mutate"))
        .header("content-type", "application/json")
        .body(fixture("admission-pod-create-from-statefulset.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let review: serde_json::Value = res.json().await.unwrap();
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");

    let res = client
        .get(format!("{base}/v1/bundle"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), identity.ca.bundle_pem());

    // A client limited to TLS 1.2 cannot connect.
    let tls12 = rustls::ClientConfig::builder_with_provider(medmesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots(&dev.ca().cert_pem))
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let refused = tokio_rustls::TlsConnector::from(Arc::new(tls12))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(refused.is_err(), "TLS 1.2 handshake succeeded");

    // Shutdown: the listener stops and the task ends within the drain deadline.
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("drained in time")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

#[tokio::test]
async fn admin_reports_liveness_readiness_and_metrics() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let registry = prometheus::Registry::new_custom(Some("medmesh_operator".into()), None).unwrap();
    let metrics = Metrics::register(&registry).unwrap();
    metrics.admission(medmesh_operator::metrics::AdmissionResult::Injected);
    let ready = Arc::new(AtomicBool::new(false));
    let app = run::admin_router(Admin {
        ready: ready.clone(),
        registry,
    });
    let get = |path: &'static str| {
        let app = app.clone();
        async move {
            let res = app
                .oneshot(
                    axum::http::Request::get(path)
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = res.status().as_u16();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    assert_eq!(get("/live").await.0, 200);
    assert_eq!(get("/ready").await.0, 503);
    ready.store(true, std::sync::atomic::Ordering::Release);
    assert_eq!(get("/ready").await.0, 200);
    let (status, text) = get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains(r#"medmesh_operator_admissions_total{result="injected"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"medmesh_operator_certificates_total{result="issued"} 0"#),
        "{text}"
    );
}
