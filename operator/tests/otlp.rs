//! Trace export end to end: the subscriber `main` installs ([`telemetry::init`]) with an OTLP
//! endpoint, the webhook and the identity service driven in process, and a collector in the
//! test that receives `POST /v1/traces`. What arrives is decoded as an
//! `ExportTraceServiceRequest` and checked: the resource, the admission and certificate spans
//! and their attributes, and that no token or CSR was sent.
//!
//! One test per binary: it installs the process's global subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::routing::post;
use http_body_util::BodyExt;
use medmesh_core::TrustDomain;
use medmesh_operator::events::NoEvents;
use medmesh_operator::identity::{self, IdentityService, IssuerCa, RecordedReviewer};
use medmesh_operator::metrics::Metrics;
use medmesh_operator::telemetry::{self, Otlp};
use medmesh_operator::webhook::{self, InjectConfig, WebhookState};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use rcgen::{CertificateParams, KeyPair, SanType};
use serde_json::{Value, json};
use tower::ServiceExt;

const MODALITY: &str = "spiffe://cluster.local/ns/radiology/sa/modality";
const NAMESPACE: &str = "medmesh-test";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn token_of(name: &str) -> String {
    let v: Value = serde_json::from_str(&fixture(name)).unwrap();
    v["spec"]["token"].as_str().unwrap().to_owned()
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// What the collector received: (content type, body) per request.
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

/// A minimal OTLP/HTTP collector on a loopback port: records every `POST /v1/traces` and
/// answers with an empty `ExportTraceServiceResponse` (zero bytes of protobuf).
async fn collector() -> (std::net::SocketAddr, Received) {
    let received = Received::default();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            post(
                |State(r): State<Received>, headers: HeaderMap, body: Bytes| async move {
                    let ct = headers
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    r.lock().unwrap().push((ct, body));
                    (
                        [(header::CONTENT_TYPE, "application/x-protobuf")],
                        Bytes::new(),
                    )
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, received)
}

async fn admit(state: &WebhookState, fixture_name: &str) -> Value {
    let res = webhook::router(state.clone())
        .oneshot(
            Request::post("/mutate")
                .header("content-type", "application/json")
                .body(Body::from(fixture(fixture_name)))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

async fn certificate(svc: &Arc<IdentityService<RecordedReviewer>>, csr: &str, token: &str) -> u16 {
    let res = identity::router(svc.clone())
        .oneshot(
            Request::post("/v1/certificate")
                .header("content-type", "application/json")
                .body(Body::from(json!({"csr": csr, "token": token}).to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    res.status().as_u16()
}

fn text(v: Option<&AnyValue>) -> Option<String> {
    match v?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .filter_map(|kv| Some((kv.key.clone(), text(kv.value.as_ref())?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_and_certificate_spans_reach_the_collector() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (addr, received) = collector().await;
    let otlp = Otlp {
        endpoint: format!("http://{addr}/"),
        namespace: NAMESPACE.into(),
    };
    let telemetry =
        telemetry::init(tracing_subscriber::EnvFilter::new("info"), Some(&otlp)).unwrap();
    assert!(telemetry.exports());

    // Two admissions: a controller-made Pod (patched) and a dry run.
    let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
    let state = WebhookState {
        config: Arc::new(InjectConfig {
            sidecar_image: "ghcr.io/medmesh/sidecar:0.1.0".into(),
            image_pull_policy: None,
            trust_domain: td(),
            identity_url: "https://medmesh-operator.medmesh-system.svc:8443".into(),
            version: "0.1.0".into(),
            native_sidecar: true,
            otlp_endpoint: None,
        }),
        events: Arc::new(NoEvents),
        metrics: metrics.clone(),
    };
    let patched = admit(&state, "admission-pod-create-from-replicaset.json").await;
    assert!(patched["response"]["patch"].is_string(), "{patched}");
    admit(&state, "admission-pod-create-dry-run.json").await;

    // Two certificate requests: one issued, one refused (a token the API server rejected).
    let svc = Arc::new(IdentityService {
        ca: Arc::new(IssuerCa::generate(&td(), SystemTime::now()).unwrap()),
        reviewer: RecordedReviewer::from_json([
            fixture("tokenreview-authenticated.json").as_str(),
            fixture("tokenreview-invalid-signature.json").as_str(),
        ])
        .unwrap(),
        trust_domain: td(),
        ttl: identity::DEFAULT_TTL,
        metrics,
    });
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(MODALITY.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let good = token_of("tokenreview-authenticated.json");
    let bad = token_of("tokenreview-invalid-signature.json");
    assert_eq!(certificate(&svc, &csr, &good).await, 200);
    assert_eq!(certificate(&svc, &csr, &bad).await, 401);

    // What main does at the end: flush and stop the export thread (blocking).
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap()
        .unwrap();

    let received = received.lock().unwrap().clone();
    assert!(!received.is_empty(), "the collector received nothing");
    let mut spans: Vec<(BTreeMap<String, String>, Span)> = Vec::new();
    for (content_type, body) in &received {
        assert_eq!(content_type, "application/x-protobuf");
        // Secrets never leave the process: neither token nor any part of the CSR.
        for secret in [good.as_str(), bad.as_str(), "CERTIFICATE REQUEST"] {
            assert!(
                !body.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "an export carries {secret:?}"
            );
        }
        let req = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
        for rs in req.resource_spans {
            let resource = attrs(&rs.resource.unwrap_or_default().attributes);
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (resource.clone(), s)));
            }
        }
    }
    let named = |name: &str| -> Vec<(BTreeMap<String, String>, BTreeMap<String, String>)> {
        spans
            .iter()
            .filter(|(_, s)| s.name == name)
            .map(|(r, s)| (r.clone(), attrs(&s.attributes)))
            .collect()
    };
    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();

    let admissions = named("admission");
    assert_eq!(admissions.len(), 2, "spans: {names:?}");
    for (resource, _) in admissions.iter().chain(&named("issue_certificate")) {
        assert_eq!(resource["service.name"], "medmesh-operator");
        assert_eq!(resource["service.version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(resource["k8s.namespace.name"], NAMESPACE);
    }
    let by_pod: BTreeMap<&str, &BTreeMap<String, String>> = admissions
        .iter()
        .map(|(_, a)| (a["pod"].as_str(), a))
        .collect();
    let replicaset = by_pod["orthanc-d88f4f5fd-*"];
    assert_eq!(replicaset["namespace"], "radiology");
    assert_eq!(replicaset["result"], "patched");
    assert_eq!(replicaset["outcome"], "injected");
    assert_eq!(replicaset["dry_run"], "false");
    let dry = by_pod["dryrun-viewer"];
    assert_eq!(dry["dry_run"], "true");
    assert_eq!(dry["result"], "patched");

    let mut issues: Vec<BTreeMap<String, String>> = named("issue_certificate")
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    issues.sort_by(|a, b| a["result"].cmp(&b["result"]));
    assert_eq!(issues.len(), 2, "spans: {names:?}");
    assert_eq!(issues[0]["result"], "issued");
    assert_eq!(issues[0]["spiffe_id"], MODALITY);
    assert_eq!(issues[1]["result"], "unauthenticated");
    assert!(!issues[1].contains_key("spiffe_id"), "{:?}", issues[1]);
}
