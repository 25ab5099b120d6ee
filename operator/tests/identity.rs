//! The identity service with TokenReview answers recorded from a real API server: what it issues
//! verifies as an X.509-SVID against the bundle it serves, and every refusal has its status and
//! message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
use medmesh_core::TrustDomain;
use medmesh_core::tls::{TrustBundle, Usage, verify_svid};
use medmesh_operator::identity::{
    self, CertificateResponse, IdentityService, IssuerCa, RecordedReviewer, ReviewError,
    TokenReviewer,
};
use medmesh_operator::metrics::{IssueResult, Metrics};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::{Value, json};
use tower::ServiceExt;

const MODALITY: &str = "spiffe://cluster.local/ns/radiology/sa/modality";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// The token of a recorded review.
fn token_of(name: &str) -> String {
    let v: Value = serde_json::from_str(&fixture(name)).unwrap();
    v["spec"]["token"].as_str().unwrap().to_owned()
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn csr(sans: &[SanType]) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans.to_vec();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

struct Harness<R> {
    svc: Arc<IdentityService<R>>,
}

impl<R: TokenReviewer> Harness<R> {
    fn new(reviewer: R) -> Self {
        Self::with_ca(
            reviewer,
            IssuerCa::generate(&td(), SystemTime::now()).unwrap(),
        )
    }

    fn with_ca(reviewer: R, ca: IssuerCa) -> Self {
        Self {
            svc: Arc::new(IdentityService {
                ca: Arc::new(ca),
                reviewer,
                trust_domain: td(),
                ttl: identity::DEFAULT_TTL,
                metrics: Metrics::register(&prometheus::Registry::new()).unwrap(),
            }),
        }
    }

    async fn post(&self, body: String) -> (StatusCode, Value) {
        let res = identity::router(self.svc.clone())
            .oneshot(
                Request::post("/v1/certificate")
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    async fn request(&self, csr: &str, token: &str) -> (StatusCode, Value) {
        self.post(json!({"csr": csr, "token": token}).to_string())
            .await
    }

    /// Expects a refusal with `status` whose message contains `want`.
    async fn refused(&self, csr: &str, token: &str, status: StatusCode, want: &str) {
        let (got, body) = self.request(csr, token).await;
        assert_eq!(got, status, "{body}");
        let msg = body["error"].as_str().unwrap();
        assert!(msg.contains(want), "{want:?} not in {msg:?}");
    }
}

fn recorded() -> RecordedReviewer {
    RecordedReviewer::from_json([
        fixture("tokenreview-authenticated.json").as_str(),
        fixture("tokenreview-invalid-signature.json").as_str(),
    ])
    .unwrap()
}

/// Verifies an issued chain with the mesh's own SVID verification, against the served bundle.
fn verify(resp: &CertificateResponse) -> String {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(resp.certificate.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let bundle = TrustBundle::from_pem(resp.bundle.as_bytes(), td()).unwrap();
    let provider = medmesh_core::tls::provider();
    let now = UnixTime::now();
    let mut ids = Vec::new();
    for usage in [Usage::Client, Usage::Server] {
        let id = verify_svid(&bundle, &provider, &chain[0], &chain[1..], now, usage).unwrap();
        ids.push(id.to_string());
    }
    assert_eq!(ids[0], ids[1]);
    // A leaf, never a CA, valid about 24 h.
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let bc = leaf.basic_constraints().unwrap().map(|b| b.value.ca);
    assert_ne!(bc, Some(true), "issued a CA certificate");
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && eku.server_auth);
    let v = leaf.validity();
    let life = v.not_after.timestamp() - v.not_before.timestamp();
    assert_eq!(life, 24 * 3600 + 300, "24 h plus 5 min backdating");
    ids.remove(0)
}

#[tokio::test]
async fn issues_the_token_identity_as_a_verifiable_svid() {
    let h = Harness::new(recorded());
    let (status, body) = h
        .request(
            &csr(&[uri(MODALITY)]),
            &token_of("tokenreview-authenticated.json"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resp: CertificateResponse = serde_json::from_value(body).unwrap();
    assert_eq!(verify(&resp), MODALITY);
    assert!(resp.not_after.ends_with('Z'), "{}", resp.not_after);
    assert_eq!(h.svc.metrics.certificates(IssueResult::Issued), 1);

    // The bundle endpoint serves the same bundle.
    let res = identity::router(h.svc.clone())
        .oneshot(Request::get("/v1/bundle").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8(bytes.to_vec()).unwrap(), resp.bundle);
}

#[tokio::test]
async fn unauthenticated_tokens_get_401() {
    let good_csr = csr(&[uri(MODALITY)]);
    let h = Harness::new(recorded());
    h.refused(
        &good_csr,
        &token_of("tokenreview-invalid-signature.json"),
        StatusCode::UNAUTHORIZED,
        "token not authenticated: [invalid bearer token, square/go-jose: error in cryptographic primitive]",
    )
    .await;
    h.refused(
        &good_csr,
        "never-seen",
        StatusCode::UNAUTHORIZED,
        "token not authenticated",
    )
    .await;

    // What the API server answered when the token was reviewed for another audience.
    let wrong =
        RecordedReviewer::from_json([fixture("tokenreview-wrong-audience.json").as_str()]).unwrap();
    Harness::new(wrong)
        .refused(
            &good_csr,
            &token_of("tokenreview-wrong-audience.json"),
            StatusCode::UNAUTHORIZED,
            "is invalid for the target audiences",
        )
        .await;

    // An expired token. Not recorded: the API server's answer for an expired bound token.
    let mut expired = RecordedReviewer::default();
    expired.insert(
        "expired",
        TokenReviewStatus {
            authenticated: Some(false),
            error: Some("[invalid bearer token, service account token has expired]".into()),
            ..TokenReviewStatus::default()
        },
    );
    Harness::new(expired)
        .refused(
            &good_csr,
            "expired",
            StatusCode::UNAUTHORIZED,
            "has expired",
        )
        .await;

    // Authenticated, but not for our audience (an API server that ignores audiences).
    let mut other = RecordedReviewer::default();
    let mut status: TokenReviewStatus = serde_json::from_value(
        serde_json::from_str::<Value>(&fixture("tokenreview-authenticated.json")).unwrap()
            ["status"]
            .clone(),
    )
    .unwrap();
    status.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
    other.insert("t", status);
    Harness::new(other)
        .refused(
            &good_csr,
            "t",
            StatusCode::UNAUTHORIZED,
            "not valid for audience medmesh-identity",
        )
        .await;
}

#[tokio::test]
async fn csrs_asking_for_anything_else_get_403() {
    let h = Harness::new(recorded());
    let token = token_of("tokenreview-authenticated.json");
    let cases = [
        (
            csr(&[uri("spiffe://cluster.local/ns/pacs/sa/viewer")]),
            "CSR asks for spiffe://cluster.local/ns/pacs/sa/viewer, but the token is that of spiffe://cluster.local/ns/radiology/sa/modality",
        ),
        (
            csr(&[uri("spiffe://other.org/ns/radiology/sa/modality")]),
            "outside trust domain cluster.local",
        ),
        (
            csr(&[
                uri(MODALITY),
                uri("spiffe://cluster.local/ns/radiology/sa/other"),
            ]),
            "CSR has 2 subject alternative names",
        ),
        (
            csr(&[
                uri(MODALITY),
                SanType::DnsName("modality.radiology".try_into().unwrap()),
            ]),
            "CSR has 2 subject alternative names",
        ),
        (csr(&[]), "CSR has no subject alternative name"),
        (
            csr(&[SanType::DnsName("modality".try_into().unwrap())]),
            "is not a URI",
        ),
        (csr(&[uri("https://example.org/x")]), "is not a SPIFFE ID"),
    ];
    for (c, want) in cases {
        h.refused(&c, &token, StatusCode::FORBIDDEN, want).await;
    }
    assert_eq!(h.svc.metrics.certificates(IssueResult::Forbidden), 7);

    // A user that is not a service account.
    let mut admin = RecordedReviewer::default();
    admin.insert(
        "admin",
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec!["medmesh-identity".into()]),
            user: Some(UserInfo {
                username: Some("kubernetes-admin".into()),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        },
    );
    Harness::new(admin)
        .refused(
            &csr(&[uri(MODALITY)]),
            "admin",
            StatusCode::FORBIDDEN,
            "token of \"kubernetes-admin\" is not a service account token",
        )
        .await;
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let h = Harness::new(recorded());
    let token = token_of("tokenreview-authenticated.json");
    h.refused(
        "not a csr",
        &token,
        StatusCode::BAD_REQUEST,
        "malformed CSR",
    )
    .await;
    // One flipped bit in the signature: proof of possession fails.
    let good = csr(&[uri(MODALITY)]);
    let der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = pem(&bytes);
    h.refused(
        &tampered,
        &token,
        StatusCode::BAD_REQUEST,
        "its signature does not verify",
    )
    .await;
    let (status, body) = h.post("{".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed request")
    );
    let (status, body) = h
        .post(json!({"csr": good, "token": token, "extra": 1}).to_string())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `extra`"),
        "{body}"
    );
    h.refused(&good, "", StatusCode::BAD_REQUEST, "token is empty")
        .await;
    assert_eq!(h.svc.metrics.certificates(IssueResult::BadRequest), 5);
}

fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<_> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

struct Failing;

impl TokenReviewer for Failing {
    async fn review(&self, _token: &str) -> Result<TokenReviewStatus, ReviewError> {
        Err(ReviewError("connection refused".into()))
    }
}

#[tokio::test]
async fn review_failures_get_503() {
    let h = Harness::new(Failing);
    h.refused(
        &csr(&[uri(MODALITY)]),
        "t",
        StatusCode::SERVICE_UNAVAILABLE,
        "TokenReview failed: connection refused",
    )
    .await;
    assert_eq!(h.svc.metrics.certificates(IssueResult::Error), 1);
}

#[tokio::test]
async fn ca_round_trips_through_a_secret_and_files() {
    let ca = IssuerCa::generate(&td(), SystemTime::now()).unwrap();
    let secret = ca.to_secret("medmesh-system", "medmesh-identity-ca");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let again = IssuerCa::from_secret(&secret).unwrap();
    assert_eq!(again.bundle_pem(), ca.bundle_pem());

    let dir = tempfile::tempdir().unwrap();
    let data = secret.data.unwrap();
    for k in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::write(dir.path().join(k), &data[k].0).unwrap();
    }
    let p = |k: &str| dir.path().join(k);
    let from_files = IssuerCa::from_files(&p("tls.crt"), &p("tls.key"), &p("ca.crt")).unwrap();
    let h = Harness::with_ca(recorded(), from_files);
    let (status, body) = h
        .request(
            &csr(&[uri(MODALITY)]),
            &token_of("tokenreview-authenticated.json"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resp: CertificateResponse = serde_json::from_value(body).unwrap();
    assert_eq!(verify(&resp), MODALITY);
    assert_eq!(resp.bundle, ca.bundle_pem());

    // A key that is not the certificate's is refused.
    let other = KeyPair::generate().unwrap().serialize_pem();
    let err = IssuerCa::from_pem(
        std::str::from_utf8(&data["tls.crt"].0).unwrap(),
        &other,
        ca.bundle_pem(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not match the issuer certificate"),
        "{err}"
    );
    let err = IssuerCa::from_files(&p("missing"), &p("tls.key"), &p("ca.crt")).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[tokio::test]
async fn an_intermediate_issuer_sends_its_chain() {
    // A root kept offline and an intermediate the operator signs with (as cert-manager would
    // provide): workloads get leaf + intermediate and trust only the root.
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root, root_key);
    let int_key = KeyPair::generate().unwrap();
    let mut int = CertificateParams::new(Vec::<String>::new()).unwrap();
    int.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    int.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    int.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    let int_cert = int.signed_by(&int_key, &root_issuer).unwrap();
    let ca = IssuerCa::from_pem(
        &format!("{}{}", int_cert.pem(), root_cert.pem()),
        &int_key.serialize_pem(),
        &root_cert.pem(),
    )
    .unwrap();
    let h = Harness::with_ca(recorded(), ca);
    let (status, body) = h
        .request(
            &csr(&[uri(MODALITY)]),
            &token_of("tokenreview-authenticated.json"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resp: CertificateResponse = serde_json::from_value(body).unwrap();
    assert_eq!(resp.certificate.matches("BEGIN CERTIFICATE").count(), 2);
    assert_eq!(verify(&resp), MODALITY);
}
