//! The sidecar's identity-service client against a test double of the operator's identity
//! service (real HTTPS, real CSRs signed by a real CA; the double skips the TokenReview, which
//! needs an API server): the first certificate arrives, renewals happen at half-life with a new
//! key, and failed renewals keep the last good credentials.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine as _;
use medmesh_core::TrustDomain;
use medmesh_core::devca::{DevCa, LeafOptions};
use medmesh_core::wire::{CertificateRequest, CertificateResponse};
use medmesh_sidecar::identity::IdentitySource as _;
use medmesh_sidecar::identity_csr::{CsrConfig, CsrIdentity};
use medmesh_sidecar::metrics::Metrics;
use rcgen::{CertificateSigningRequestParams, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject as _;

struct Double {
    issuer: Issuer<'static, KeyPair>,
    bundle: String,
    lifetime: time::Duration,
    issued: AtomicUsize,
    fail: AtomicBool,
}

async fn issue(
    State(d): State<Arc<Double>>,
    Json(req): Json<CertificateRequest>,
) -> Result<Json<CertificateResponse>, (StatusCode, String)> {
    if d.fail.load(Ordering::SeqCst) {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "double: failing".into()));
    }
    assert!(req.token.contains('.'), "the token is sent");
    let mut csr = CertificateSigningRequestParams::from_pem(&req.csr)
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let now = time::OffsetDateTime::now_utc();
    csr.params.not_before = now - time::Duration::seconds(5);
    csr.params.not_after = now + d.lifetime;
    csr.params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = csr
        .signed_by(&d.issuer)
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    d.issued.fetch_add(1, Ordering::SeqCst);
    Ok(Json(CertificateResponse {
        certificate: cert.pem(),
        bundle: d.bundle.clone(),
        not_after: (now + d.lifetime)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap(),
    }))
}

fn jwt(ns: &str, sa: &str) -> String {
    let e = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.c2ln",
        e(r#"{"alg":"RS256","kid":"k"}"#.into()),
        e(format!(
            r#"{{"aud":["medmesh-identity"],"kubernetes.io":{{"namespace":"{ns}","serviceaccount":{{"name":"{sa}"}}}}}}"#
        ))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_arrive_renew_at_half_life_and_survive_failures() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let td = TrustDomain::new("medmesh.test").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The workload CA (what the service signs with) and a serving CA for its HTTPS.
    let ca = DevCa::new(&td, 1).unwrap();
    let issuer = Issuer::from_ca_cert_pem(
        &ca.ca().cert_pem,
        KeyPair::from_pem(&ca.ca().key_pem).unwrap(),
    )
    .unwrap();
    let serving_ca = DevCa::new(&TrustDomain::new("serving.test").unwrap(), 1).unwrap();
    let serving = serving_ca
        .issue(
            &"spiffe://serving.test/operator".parse().unwrap(),
            &LeafOptions {
                dns: vec!["localhost".into()],
                ..Default::default()
            },
        )
        .unwrap();
    std::fs::write(dir.path().join("service-ca.crt"), &serving_ca.ca().cert_pem).unwrap();
    std::fs::write(dir.path().join("token"), jwt("pacs", "orthanc")).unwrap();

    let double = Arc::new(Double {
        issuer,
        bundle: ca.ca().cert_pem.clone(),
        lifetime: time::Duration::seconds(4),
        issued: AtomicUsize::new(0),
        fail: AtomicBool::new(false),
    });
    let app = axum::Router::new()
        .route("/v1/certificate", axum::routing::post(issue))
        .with_state(double.clone());
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            rustls::pki_types::CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
                .map(Result::unwrap)
                .collect(),
            rustls::pki_types::pem::PemObject::from_pem_slice(serving.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });

    let metrics = Metrics::register(&prometheus::Registry::new());
    let source = CsrIdentity::spawn(
        CsrConfig {
            url: format!("https://localhost:{port}"),
            token: dir.path().join("token"),
            service_ca: dir.path().join("service-ca.crt"),
            trust_domain: td.clone(),
            max_backoff: Duration::from_millis(500),
        },
        metrics.clone(),
    );
    let mut rx = source.credentials();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
        .await
        .expect("no certificate within 10 s")
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(
        first.identity.id().as_str(),
        "spiffe://medmesh.test/ns/pacs/sa/orthanc"
    );
    assert_eq!(metrics.ready.get(), 1);

    // Half of a 4 s lifetime: a renewal within about 2 s, with a new key and certificate.
    rx.mark_unchanged();
    tokio::time::timeout(Duration::from_secs(6), rx.changed())
        .await
        .expect("no renewal at half-life")
        .unwrap();
    let second = rx.borrow().clone().unwrap();
    assert_ne!(first.identity.chain()[0], second.identity.chain()[0]);
    assert!(double.issued.load(Ordering::SeqCst) >= 2);

    // The service fails: the last good credentials stay, and failures are counted.
    double.fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = rx.borrow().clone().unwrap();
    assert_eq!(kept.identity.chain()[0], second.identity.chain()[0]);
    assert!(metrics.cert_reloads.with_label_values(&["error"]).get() >= 1);
    // It recovers.
    double.fail.store(false, Ordering::SeqCst);
    rx.mark_unchanged();
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("no certificate after the service recovered")
        .unwrap();
}
